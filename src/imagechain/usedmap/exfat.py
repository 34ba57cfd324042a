"""Used clusters of an exFAT volume, read from its main boot region, its FAT and its Allocation Bitmap.

The bitmap is the allocation: files marked NoFatChain have no FAT entries, so the FAT alone says nothing.
It is found through its directory entry (type 0x81) in the root directory, whose cluster chain the FAT
always holds. With two FATs (TexFAT) there are two bitmaps: a cluster set in either counts as used. exFAT
has no journal, so a volume whose VolumeDirty flag is set is parsed all the same, described "(dirty)".

Used: everything before the cluster heap (main and backup boot regions, the FAT(s), what lies between),
every cluster set in a bitmap, and everything past the cluster heap to the end of the area.

Unusable when: the name at offset 3 is not "EXFAT   ", the 0x55AA signature is missing or bytes 11..63 are
not zero; the main boot region's checksum (sectors 0..10, bytes 106, 107 and 112 skipped) differs from any
copy in sector 11; the revision is not 1.x; a field is out of its documented range (sector shift 9..12,
cluster size up to 32 MiB, 1 or 2 FATs, FatOffset at or past sector 24, FATs inside the space before the
heap and large enough for ClusterCount, the heap inside VolumeLength, the root cluster in 2..ClusterCount+1);
VolumeLength is larger than the area; the root directory's FAT chain leaves the heap, loops or ends on a free
or bad entry; the root directory has no Allocation Bitmap entry (or two for one FAT, or a second one without
TexFAT), or one shorter than ClusterCount bits, or one starting outside the heap; a bitmap's FAT chain is not
contiguous; a bitmap marks the root directory, itself or the up-case table free.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import Area, Unusable, unit_text

_EOC = 0xFFFFFFFF
_BAD = 0xFFFFFFF7
_MAX_DIR = 256 << 20  # bytes: the largest directory the specification allows


@dataclass(frozen=True)
class ExfatLayout:
    sector: int  # bytes
    cluster: int  # bytes
    fat_offset: int  # bytes, of the first FAT
    fat_bytes: int  # bytes of one FAT
    fats: int
    active: int  # the FAT (and bitmap) in use
    heap_offset: int  # bytes, of cluster 2
    clusters: int  # clusters 2 .. clusters + 1
    root: int  # first cluster of the root directory
    size: int  # bytes of the volume
    flags: int  # VolumeFlags


def boot_checksum(region: bytes, sector: int) -> int:
    """The documented rotate-and-add checksum of sectors 0..10, VolumeFlags and PercentInUse excluded."""
    c = 0
    for i, b in enumerate(region[: 11 * sector]):
        if i in (106, 107, 112):
            continue
        c = (((c >> 1) | ((c & 1) << 31)) + b) & 0xFFFFFFFF
    return c


def layout(area: Area) -> ExfatLayout:
    """The geometry from the main boot sector, checked against its checksum and the documented ranges."""
    boot = area.read(0, 512)
    if boot[3:11] != b"EXFAT   " or boot[510:512] != b"\x55\xaa":
        raise Unusable("exFAT: no main boot sector (name or 0x55AA signature missing)")
    if any(boot[11:64]):
        raise Unusable("exFAT: the MustBeZero bytes of the boot sector are not zero")
    vol_len, fat_off, fat_len, heap_off, count, root, _serial, rev, flags, bps_sh, spc_sh, nfats = (
        struct.unpack_from("<QIIIIIIHHBBB", boot, 72))
    if not 9 <= bps_sh <= 12 or bps_sh + spc_sh > 25:
        raise Unusable(f"exFAT: sector shift {bps_sh}, cluster shift {spc_sh} out of range")
    bps = 1 << bps_sh
    region = area.read(0, 12 * bps)
    checksum = boot_checksum(region, bps)
    stored = np.frombuffer(region, "<u4", bps // 4, 11 * bps)
    if (stored != checksum).any():
        raise Unusable(f"exFAT: main boot region checksum {checksum:#010x} does not match the stored "
                       f"{int(stored[0]):#010x}")  # fmt: skip
    if rev >> 8 != 1:
        raise Unusable(f"exFAT: unknown revision {rev >> 8}.{rev & 0xFF}")
    if nfats not in (1, 2):
        raise Unusable(f"exFAT: {nfats} FATs")
    if fat_off < 24 or fat_len * bps < (count + 2) * 4 or fat_off + nfats * fat_len > heap_off:
        raise Unusable(f"exFAT: FAT at sector {fat_off}, {fat_len} sectors x {nfats}, heap at {heap_off}: "
                       f"inconsistent with {count} clusters")  # fmt: skip
    if count == 0 or count > 0xFFFFFFF5 or heap_off + (count << spc_sh) > vol_len:
        raise Unusable(f"exFAT: {count} clusters from sector {heap_off} do not fit {vol_len} sectors")
    if not 2 <= root <= count + 1:
        raise Unusable(f"exFAT: root directory cluster {root} is out of range")
    if vol_len * bps > area.size:
        raise Unusable(f"exFAT: the volume ({vol_len * bps} bytes) is larger than its area ({area.size} bytes)")
    active = flags & 1 if nfats == 2 else 0
    return ExfatLayout(bps, bps << spc_sh, fat_off * bps, fat_len * bps, nfats, active, heap_off * bps, count,
                       root, vol_len * bps, flags)  # fmt: skip


def _next(area: Area, lay: ExfatLayout, cluster: int) -> int:
    """The FAT entry of a cluster: chains read here are short (the root directory, the bitmap)."""
    return int.from_bytes(area.read(lay.fat_offset + lay.active * lay.fat_bytes + cluster * 4, 4), "little")


def _chain(area: Area, lay: ExfatLayout, first: int, what: str, limit: int) -> list[int]:
    """Up to `limit` clusters of a FAT chain from `first` towards its end-of-chain mark."""
    out: list[int] = []
    seen: set[int] = set()
    c = first
    while c != _EOC and len(out) < limit:
        if not 2 <= c <= lay.clusters + 1:
            to = "a bad or free entry" if c in (0, _BAD) else f"cluster {c}"
            raise Unusable(f"exFAT: the {what}'s cluster chain reaches {to}")
        if c in seen:
            raise Unusable(f"exFAT: the {what}'s cluster chain loops")
        seen.add(c)
        out.append(c)
        c = _next(area, lay, c)
    return out


@dataclass(frozen=True)
class ExfatUsage:
    layout: ExfatLayout
    used: np.ndarray  # bool per cluster: index i is cluster i + 2

    @property
    def dirty(self) -> bool:
        return bool(self.layout.flags & 2)


def cluster_usage(area: Area) -> ExfatUsage:
    """Which clusters the Allocation Bitmap(s) mark used, with the checks that make it trustworthy."""
    lay = layout(area)
    root = _chain(area, lay, lay.root, "root directory", _MAX_DIR // lay.cluster + 1)
    if len(root) * lay.cluster > _MAX_DIR:
        raise Unusable("exFAT: the root directory's cluster chain is longer than a directory can be (256 MiB)")
    bitmaps: dict[int, tuple[int, int]] = {}  # bitmap index -> (first cluster, length)
    upcase = 0
    for cl in root:
        entries = np.frombuffer(area.read(lay.heap_offset + (cl - 2) * lay.cluster, lay.cluster), np.uint8)
        types = entries[::32]
        end = np.flatnonzero(types == 0)
        for i in np.flatnonzero(np.isin(types[: end[0] if len(end) else len(types)], (0x81, 0x82))).tolist():
            e = entries[i * 32 : i * 32 + 32].tobytes()
            first, length = struct.unpack_from("<IQ", e, 20)
            if e[0] == 0x82:
                upcase = first
                continue
            which = e[1] & 1
            if which in bitmaps or which >= lay.fats:
                raise Unusable(f"exFAT: unexpected allocation bitmap entry {which} with {lay.fats} FAT(s)")
            bitmaps[which] = (first, length)
        if len(end):
            break
    if len(bitmaps) != lay.fats:
        raise Unusable(f"exFAT: the root directory holds {len(bitmaps)} allocation bitmap entries, {lay.fats} FAT(s)")
    need = -(-lay.clusters // 8)
    used = np.zeros(lay.clusters, bool)
    for which, (first, length) in sorted(bitmaps.items()):
        if length < need:
            raise Unusable(f"exFAT: allocation bitmap {which} has {length} bytes, {need} needed for {lay.clusters} "
                           "clusters")  # fmt: skip
        if not 2 <= first <= lay.clusters + 1:
            raise Unusable(f"exFAT: allocation bitmap {which} starts at cluster {first}, outside the heap")
        n = -(-need // lay.cluster)
        run = list(range(first, first + n))
        chained = _next(area, lay, first) != 0  # a FAT chain is recorded: it must be the contiguous run read
        if chained and _chain(area, lay, first, f"allocation bitmap {which}", n) != run:
            raise Unusable(f"exFAT: allocation bitmap {which} is fragmented")
        if run[-1] > lay.clusters + 1:
            raise Unusable(f"exFAT: allocation bitmap {which} runs past the cluster heap")
        raw = np.frombuffer(area.read(lay.heap_offset + (first - 2) * lay.cluster, need), np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: lay.clusters].astype(bool)
        for name, cls in (("root directory", root), ("bitmap", run), ("up-case table", [upcase] if upcase else [])):
            free = [c for c in cls if 2 <= c <= lay.clusters + 1 and not bits[c - 2]]
            if free:
                raise Unusable(f"exFAT: allocation bitmap {which} marks the {name}'s cluster {free[0]} free")
        used |= bits
    return ExfatUsage(lay, used)


def parse(area: Area) -> str:
    u = cluster_usage(area)
    lay = u.layout
    n = area.heap(lay.heap_offset, lay.cluster, u.used)
    desc = f"exFAT, {unit_text(lay.cluster)} clusters, {n} of {lay.clusters} in use"
    if lay.flags & 4:
        desc += ", media failure flagged"
    return desc + (" (dirty)" if u.dirty else "")
