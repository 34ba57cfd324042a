"""The NTFS used-cluster parser against real volumes made by mkntfs and filled through ntfs-3g: it must
agree with libntfs-3g's own view (ntfscluster's free count, every run ntfsinfo lists for every MFT
record), a copy with every block it calls unused zeroed must still check clean and hold the same files,
and damaged, dirty or unreplayed volumes must be refused."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imagechain.usedmap import Area, Unusable, UsedMap
from imagechain.usedmap.ntfs import Geometry, cluster_map, parse

from .conftest import need_tool
from .fsfill import check_fs, fill, mounted_fs, need_kind, tree, zero_unused
from .fsimages import FsKind, FuseDisk

pytestmark = pytest.mark.root

SIZE = 64 << 20
# (seed, extra mkntfs options): the default 4 KiB clusters; 64 KiB clusters; 128 KiB ones (256 sectors per
# cluster: the boot sector stores 0xF8, meaning 2^(256 - 0xF8)); 4 KiB sectors (4 KiB MFT records, eight
# fixup strides each)
CASES = [(1, ()), (2, ()), (3, ()), (4, ("-c", "65536")), (5, ("-s", "4096", "-c", "16384")), (6, ("-c", "131072"))]


def mkntfs(folder: Path, name: str, *opts: str) -> Path:
    need_kind("ntfs")
    need_tool("ntfscluster", "ntfsinfo")
    img = folder / f"{name}.fsimg"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkntfs", "-F", "-Q", *opts, str(img)], check=True, capture_output=True, timeout=120)
    return img


def area_of(img: Path, block_size: int = 4096, size: int | None = None) -> tuple[Area, UsedMap, int]:
    fd = os.open(img, os.O_RDONLY)
    n = size if size is not None else os.fstat(fd).st_size
    m = UsedMap(n, block_size)

    def rd(o: int, k: int) -> bytes:
        return os.pread(fd, k, o)

    return Area(0, n, rd, m), m, fd


def parse_img(img: Path, block_size: int = 4096, size: int | None = None) -> tuple[str, np.ndarray]:
    area, m, fd = area_of(img, block_size, size)
    try:
        return parse(area), m.used
    finally:
        os.close(fd)


def clusters_of(img: Path) -> tuple[Geometry, np.ndarray]:
    area, _, fd = area_of(img)
    try:
        return cluster_map(area)
    finally:
        os.close(fd)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"seed{c[0]}{''.join(c[1])}")
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    seed, opts = request.param
    folder = tmp_path_factory.mktemp(f"ntfs{seed}")
    img = mkntfs(folder, "vol", *opts)
    with mounted_fs(img, "ntfs", folder / "m") as mnt:
        files = fill(mnt, random.Random(seed))
    return img, files


def tool_view(img: Path, clusters: int) -> tuple[int, int, np.ndarray]:
    """libntfs-3g's view: (free clusters per ntfscluster, clusters its MFT walk counts as user data and
    metadata, the clusters in any run of any attribute of any MFT record per ntfsinfo)."""
    info = subprocess.run(["ntfscluster", "-f", str(img)], check=True, capture_output=True, text=True).stdout

    def field(name: str) -> int:
        found = re.search(rf"^{name}\s*:\s*(\d+)", info, re.M)
        assert found, info
        return int(found.group(1))

    runs = np.zeros(clusters, bool)
    for n in range(field("initialized mft records")):
        out = subprocess.run(["ntfsinfo", "-i", str(n), "-v", str(img)], capture_output=True, text=True).stdout
        for _vcn, lcn, length in re.findall(r"^\s+0x([0-9a-f]+)\s+(0x[0-9a-f]+|<HOLE>)\s+0x([0-9a-f]+)\s*$", out, re.M):
            if lcn != "<HOLE>":
                first = int(lcn, 16)
                assert first + int(length, 16) <= clusters, f"record {n}: run {lcn}+{length} past the volume"
                runs[first : first + int(length, 16)] = True
    walked = field("clusters of user data") + field("clusters of metadata")
    return field("clusters of free space"), walked, runs


def test_matches_libntfs(filled: tuple[Path, dict[str, str]]) -> None:
    img, _ = filled
    geo, mine = clusters_of(img)
    free, walked, runs = tool_view(img, geo.clusters)
    missing = np.flatnonzero(runs & ~mine)
    extra = np.flatnonzero(mine & ~runs)
    print(f"{img.parent.name}: {geo.cluster >> 10} KiB clusters, {geo.clusters} clusters; in use: mine "
          f"{int(mine.sum())}, ntfscluster {geo.clusters - free} (MFT walk {walked}), ntfsinfo runs "
          f"{int(runs.sum())}; not marked {len(missing)}, marked beyond the runs {len(extra)}")  # fmt: skip
    assert not len(missing), f"clusters in a file's runs that the parser calls free: {missing[:20]}"
    assert int(mine.sum()) == geo.clusters - free == walked
    assert not len(extra), f"clusters the parser keeps that no run holds: {extra[:20]}"
    desc, _ = parse_img(img)
    assert desc == f"ntfs, {geo.cluster >> 10} KiB clusters, {geo.clusters - free} of {geo.clusters} in use"


@pytest.mark.parametrize("block_size", [4096, 65536])
def test_zeroed_unused_blocks_keep_the_files(filled: tuple[Path, dict[str, str]], block_size: int,
                                             tmp_path: Path) -> None:  # fmt: skip
    img, files = filled
    _, used = parse_img(img, block_size)
    assert used[0] and used[-1], "the boot sector and the backup boot sector (last sector) must be kept"
    assert used.mean() < 0.8, f"{used.mean():.0%} of the blocks used after a fill of a mostly empty volume"
    orig = np.fromfile(img, np.uint8).reshape(-1, block_size)
    stale = int(orig[~used].any(axis=1).sum())
    print(f"{img.parent.name} {block_size}: {used.mean():.1%} of {len(used)} blocks used, {stale} unused ones "
          "held stale data")  # fmt: skip
    assert stale * block_size >= 4 << 20, "the deleted files' data should lie in blocks the parser calls unused"
    copy = zero_unused(img, used, block_size, tmp_path / "zeroed.fsimg")
    assert not np.fromfile(copy, np.uint8).reshape(-1, block_size)[~used].any()
    check_fs(copy, "ntfs")
    with mounted_fs(copy, "ntfs", tmp_path / "m", readonly=True) as mnt:
        assert tree(mnt) == files


# --- damaged, dirty and unreplayed volumes ---


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ntfsbase")
    img = mkntfs(folder, "base")
    with mounted_fs(img, "ntfs", folder / "m") as mnt:
        fill(mnt, random.Random(9), count=20, big=1 << 20, stale=0)
    return img


def copy_of(fresh: Path, tmp_path: Path) -> Path:
    return Path(shutil.copyfile(fresh, tmp_path / "v.fsimg"))


def patch(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def boot_of(img: Path) -> bytes:
    with open(img, "rb") as f:
        return f.read(512)


def record_at(img: Path, n: int) -> tuple[int, int]:
    """(byte offset, size) of MFT record n: mkntfs lays the first records out in one run at the boot
    sector's MFT cluster (checked against the record's own number)."""
    boot = boot_of(img)
    bps, spc = struct.unpack_from("<HB", boot, 11)
    cluster = bps * spc
    mft_lcn = struct.unpack_from("<q", boot, 0x30)[0]
    raw = struct.unpack_from("<b", boot, 0x40)[0]
    size = raw * cluster if raw > 0 else 1 << -raw
    off = mft_lcn * cluster + n * size
    with open(img, "rb") as f:
        f.seek(off)
        rec = f.read(size)
    assert rec[:4] == b"FILE" and struct.unpack_from("<I", rec, 0x2C)[0] == n
    return off, size


def load_record(img: Path, n: int) -> bytearray:
    """MFT record n with its fixups undone (the real bytes back at the end of every 512-byte stride)."""
    off, size = record_at(img, n)
    with open(img, "rb") as f:
        f.seek(off)
        rec = bytearray(f.read(size))
    usa_ofs, count = struct.unpack_from("<HH", rec, 4)
    for i in range(1, count):
        assert rec[i * 512 - 2 : i * 512] == rec[usa_ofs : usa_ofs + 2]
        rec[i * 512 - 2 : i * 512] = rec[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]
    return rec


def protect(rec: bytearray) -> bytearray:
    """Apply multi-sector protection: save the last two bytes of each stride in the array, put the update
    sequence number there instead."""
    usa_ofs, count = struct.unpack_from("<HH", rec, 4)
    usn = (struct.unpack_from("<H", rec, usa_ofs)[0] % 0xFFFE) + 1
    struct.pack_into("<H", rec, usa_ofs, usn)
    for i in range(1, count):
        rec[usa_ofs + 2 * i : usa_ofs + 2 * i + 2] = rec[i * 512 - 2 : i * 512]
        struct.pack_into("<H", rec, i * 512 - 2, usn)
    return rec


def store_record(img: Path, n: int, rec: bytearray) -> None:
    """Write record n back, and its $MFTMirr copy for the first four records (as Windows does; ntfs-3g
    compares them byte for byte)."""
    data = bytes(protect(rec))
    patch(img, record_at(img, n)[0], data)
    if n < 4:
        boot = boot_of(img)
        bps, spc = struct.unpack_from("<HB", boot, 11)
        patch(img, struct.unpack_from("<q", boot, 0x38)[0] * bps * spc + n * len(data), data)


def attr_at(rec: bytes | bytearray, atype: int) -> int:
    pos: int = struct.unpack_from("<H", rec, 0x14)[0]
    while (t := struct.unpack_from("<I", rec, pos)[0]) != 0xFFFFFFFF:
        if t == atype and rec[pos + 9] == 0:  # unnamed
            return pos
        pos += struct.unpack_from("<I", rec, pos + 4)[0]
    raise AssertionError(f"no attribute {atype:#x}")


def expect_unusable(img: Path, match: str, size: int | None = None) -> None:
    with pytest.raises(Unusable, match=match):
        parse_img(img, size=size)


def test_fresh_volume_parses(fresh: Path) -> None:
    desc, used = parse_img(fresh)
    assert desc.startswith("ntfs, 4 KiB clusters") and used.mean() < 0.5


@pytest.mark.parametrize(("offset", "data", "match"), [
    (3, b"NTFX    ", "OEM id"),
    (11, struct.pack("<H", 3000), "bytes per sector 3000"),
    (11, struct.pack("<H", 8192), "bytes per sector 8192"),
    (13, b"\xf3", "cluster size 4194304 is above 2 MiB"),  # 2^13 sectors of 512 bytes
    (13, b"\x03", "sectors per cluster"),
    (0x40, b"\x00", "MFT record size"),
    (0x44, b"\x7f", "index record size"),
    (0x30, struct.pack("<q", 1 << 40), "MFT cluster .* is outside the volume"),
    (510, b"\x00\x00", "0x55AA"),
])  # fmt: skip
def test_bad_boot_sector(fresh: Path, tmp_path: Path, offset: int, data: bytes, match: str) -> None:
    img = copy_of(fresh, tmp_path)
    patch(img, offset, data)
    expect_unusable(img, match)


def test_area_smaller_than_volume(fresh: Path) -> None:
    expect_unusable(fresh, "larger than the area", size=SIZE - 512)  # the backup boot sector is cut off
    expect_unusable(fresh, "larger than the area", size=SIZE // 2)


@pytest.mark.parametrize(("n", "magic"), [(0, b"FILX"), (6, b"BAAD"), (3, b"\0\0\0\0")])
def test_bad_record_signature(fresh: Path, tmp_path: Path, n: int, magic: bytes) -> None:
    img = copy_of(fresh, tmp_path)
    patch(img, record_at(img, n)[0], magic)
    expect_unusable(img, f"record {n} .* has signature")


@pytest.mark.parametrize("n", [0, 2, 3, 6])
def test_fixup_mismatch(fresh: Path, tmp_path: Path, n: int) -> None:
    img = copy_of(fresh, tmp_path)
    off, _ = record_at(img, n)
    patch(img, off + 1022, b"\x5a\xa5")  # the end of the record's second stride
    expect_unusable(img, f"record {n} .*fixup mismatch in sector 1")


def test_rewritten_record_still_parses(fresh: Path, tmp_path: Path) -> None:
    """The editing helpers below reproduce valid records (new update sequence number and all)."""
    img = copy_of(fresh, tmp_path)
    for n in (0, 3, 6):
        store_record(img, n, load_record(img, n))
    assert parse_img(img)[0] == parse_img(fresh)[0]
    check_fs(img, "ntfs")


def test_bitmap_run_outside_volume(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    rec = load_record(img, 6)
    a = attr_at(rec, 0x80)
    mp = a + struct.unpack_from("<H", rec, a + 0x20)[0]
    rec[mp : mp + 7] = bytes([0x41, 1, 0, 0, 0, 0x40, 0])  # 1 cluster at LCN 2^30
    store_record(img, 6, rec)
    expect_unusable(img, "Bitmap: run .* lies outside the volume")


def test_bitmap_runlist_past_attribute(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    rec = load_record(img, 6)
    a = attr_at(rec, 0x80)
    mp = a + struct.unpack_from("<H", rec, a + 0x20)[0]
    end = a + struct.unpack_from("<I", rec, a + 4)[0]
    rec[mp:end] = (b"\x11\x01\x01" * 100)[: end - mp]  # runs of one cluster, never terminated
    store_record(img, 6, rec)
    expect_unusable(img, "Bitmap: runlist runs past its attribute")


def test_bitmap_runlist_disagrees_with_vcns(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    rec = load_record(img, 6)
    a = attr_at(rec, 0x80)
    struct.pack_into("<q", rec, a + 0x18, 5)  # highest VCN
    store_record(img, 6, rec)
    expect_unusable(img, "Bitmap: runlist covers VCNs")


def test_bitmap_too_short(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    rec = load_record(img, 6)
    a = attr_at(rec, 0x80)
    struct.pack_into("<qq", rec, a + 0x30, 1000, 1000)  # data and initialised sizes: 8000 bits
    store_record(img, 6, rec)
    expect_unusable(img, "bitmap has 8000 bits for 16383 clusters")


def test_bitmap_attribute_list(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    rec = load_record(img, 6)
    struct.pack_into("<I", rec, attr_at(rec, 0x10), 0x20)  # $STANDARD_INFORMATION becomes $ATTRIBUTE_LIST
    store_record(img, 6, rec)
    expect_unusable(img, "ATTRIBUTE_LIST")


def volume_flags_at(img: Path) -> tuple[bytearray, int]:
    rec = load_record(img, 3)
    a = attr_at(rec, 0x70)
    return rec, a + struct.unpack_from("<H", rec, a + 0x14)[0] + 10


@pytest.mark.parametrize(("flag", "match"), [(0x0001, "marked dirty"), (0x4000, "chkdsk underway")])
def test_dirty_flag_set_by_hand(fresh: Path, tmp_path: Path, flag: int, match: str) -> None:
    img = copy_of(fresh, tmp_path)
    rec, at = volume_flags_at(img)
    assert struct.unpack_from("<H", rec, at)[0] == 0
    struct.pack_into("<H", rec, at, flag)
    store_record(img, 3, rec)
    expect_unusable(img, match)
    if flag == 1:  # libntfs-3g reads the same flag: it refuses to open the volume
        r = subprocess.run(["ntfsinfo", "-m", str(img)], capture_output=True, text=True)
        assert "scheduled for check" in r.stdout + r.stderr


def test_dirty_flag_set_by_ntfsfix(fresh: Path, tmp_path: Path) -> None:
    """ntfsfix (without -d) schedules a Windows check by setting the dirty flag."""
    need_tool("ntfsfix")
    img = copy_of(fresh, tmp_path)
    subprocess.run(["ntfsfix", str(img)], check=True, capture_output=True)
    expect_unusable(img, "ntfs volume is marked dirty")
    subprocess.run(["ntfsfix", "-d", str(img)], check=True, capture_output=True)
    assert parse_img(img)[0].startswith("ntfs, ")


def logfile_at(img: Path) -> tuple[int, int]:
    """(byte offset, size) of $LogFile, which mkntfs makes in one run."""
    rec = load_record(img, 2)
    a = attr_at(rec, 0x80)
    mp = a + struct.unpack_from("<H", rec, a + 0x20)[0]
    h = rec[mp]
    ln, on = h & 0xF, h >> 4
    lcn = int.from_bytes(rec[mp + 1 + ln : mp + 1 + ln + on], "little", signed=True)
    assert rec[mp + 1 + ln + on] == 0
    return lcn * 4096, struct.unpack_from("<q", rec, a + 0x30)[0]


def restart_page(flags: int, lsn: int, log_size: int) -> bytes:
    """A 4 KiB $LogFile restart page (RSTR, version 1.1) with one NTFS client record."""
    page = bytearray(4096)
    page[:4] = b"RSTR"
    struct.pack_into("<HHQIIHhh", page, 4, 0x1E, 9, 0, 4096, 4096, 0x30, 1, 1)
    ra = 0x30
    bits = 67 - log_size.bit_length()  # what ntfs-3g checks the sequence number bits against
    # one client, in use (the in-use list starts at client 0, the free list is empty)
    struct.pack_into("<QHHHHIHHqIHHI", page, ra, lsn, 1, 0xFFFF, 0, flags, bits, 0x30 + 0xA0, 0x30, log_size,
                     0, 0x30, 0x40, 1)  # fmt: skip
    client = ra + 0x30
    struct.pack_into("<QQHHH6xI", page, client, lsn, lsn, 0xFFFF, 0xFFFF, 1, 8)
    page[client + 0x20 : client + 0x28] = "NTFS".encode("utf-16-le")
    struct.pack_into("<H", page, 0x1E, 0)  # update sequence number 0 + 1 after protect()
    return bytes(protect(page))


@pytest.mark.parametrize("clean", [False, True])
def test_logfile_restart_area(fresh: Path, tmp_path: Path, clean: bool) -> None:
    img = copy_of(fresh, tmp_path)
    log, size = logfile_at(img)
    assert set(img.read_bytes()[log : log + size]) == {0xFF}, "mkntfs/ntfs-3g leave an empty log"
    for i, lsn in enumerate((100, 200)):
        patch(img, log + 4096 * i, restart_page(0x0002 if clean else 0, lsn, size))
    if clean:
        assert parse_img(img)[0] == parse_img(fresh)[0]
        return
    expect_unusable(img, "LogFile is not clean")


def ntfs3g_complaints(img: Path, tmp_path: Path) -> str:
    """What ntfs-3g -o norecover (refuse to reset an unclean log) prints when mounting the image; it
    falls back to a read-only mount, undone here like any other."""
    err = tmp_path / "ntfs-3g.err"
    driver = ("sh", "-c", f'exec ntfs-3g -o norecover "$0" "$1" 2>{err}')
    disk = FuseDisk(FsKind("ntfs", (), False, driver, 0), img, str(img))
    try:
        disk.mount(tmp_path / "m3g")
    finally:
        disk.unmount()
    return err.read_text()


@pytest.mark.parametrize("clean", [False, True])
def test_logfile_agrees_with_ntfs3g(fresh: Path, tmp_path: Path, clean: bool) -> None:
    """ntfs-3g reads the same restart area: it calls the log unclean exactly when the parser does."""
    img = copy_of(fresh, tmp_path)
    log, size = logfile_at(img)
    for i, lsn in enumerate((100, 200)):
        patch(img, log + 4096 * i, restart_page(0x0002 if clean else 0, lsn, size))
    said = ntfs3g_complaints(img, tmp_path)
    assert ("unclean file system" in said) != clean, said
    assert "$LogFile" not in said, said  # it found the restart pages valid


def test_logfile_newest_restart_area_decides(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    log, size = logfile_at(img)
    patch(img, log, restart_page(0, 100, size))  # older: open, not clean
    patch(img, log + 4096, restart_page(0x0002, 200, size))  # newer: clean
    assert parse_img(img)[0] == parse_img(fresh)[0]
    patch(img, log, restart_page(0, 300, size))
    expect_unusable(img, "LogFile is not clean")


def test_logfile_garbage(fresh: Path, tmp_path: Path) -> None:
    img = copy_of(fresh, tmp_path)
    patch(img, logfile_at(img)[0] + 100, b"junk")
    expect_unusable(img, "LogFile has no valid restart page")
