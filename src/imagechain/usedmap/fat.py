"""Used clusters of a FAT12/FAT16/FAT32 volume, read from its boot sector (BPB) and its FATs.

The FAT type is decided as Microsoft's specification does, by the count of data clusters (< 4085 FAT12,
< 65525 FAT16, else FAT32), never by the label string. A cluster is used when its entry is non-zero in
any of the FAT copies (allocated, end of chain, bad or reserved): copies that disagree (an interrupted
update writes them one after the other) are not refused, the union is kept, and the description says how
many clusters differ. FAT has no journal, so a volume not cleanly unmounted (the dirty bit in FAT[1] or in
the boot sector's state byte) is parsed all the same and described as "(dirty)".

Used: everything before the data area (boot sector, reserved sectors with FSInfo and the backup boot
sector, every FAT copy, the FAT12/16 root directory), every used cluster, and the sectors past the last
whole cluster to the end of the area.

Unusable when: the boot sector has no jump instruction or no 0x55AA signature; bytes per sector is not a
power of two in 512..4096; sectors per cluster is not a power of two; no reserved sector; zero FATs; the
media byte is not 0xF0 or 0xF8..0xFF; the total sector count or FAT size is zero; the data area starts
past the end of the volume; the cluster count is zero or above the FAT32 maximum; the layout fields
contradict the type the cluster count gives (FAT32 with a FAT16 FAT size or fixed root directory, or
FAT12/16 without them); FAT32 with an unknown version, a root cluster out of range or marked free, or an
active FAT (mirroring off) that does not exist; the FAT is too small for the cluster count; the volume
is larger than the area; FAT[0]'s low byte differs from the BPB media byte; an entry of the active FAT is
1 or a cluster number past the last cluster that is not a reserved value (0x?FF0..0x?FF6, which Windows
treats as allocated: kept as used), the bad cluster mark or end of chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import Area, Unusable, unit_text

_CHUNK_ENTRIES = 1 << 22  # FAT32 entries decoded per read (16 MiB): bounds memory on large volumes


@dataclass(frozen=True)
class FatLayout:
    bits: int  # 12, 16 or 32
    sector: int  # bytes
    cluster: int  # bytes
    fat_offset: int  # byte offset of the first FAT
    fat_bytes: int  # bytes of one FAT copy
    fats: int
    active: int  # the FAT copy the filesystem reads (FAT32 with mirroring off), else 0
    data_offset: int  # byte offset of cluster 2
    clusters: int  # data clusters, numbered 2 .. clusters + 1
    size: int  # bytes of the volume (total sectors * sector size)
    media: int
    root_cluster: int  # FAT32 only, else 0
    dirty: bool  # boot sector state byte says not cleanly unmounted (FAT[1] is checked later)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def layout(boot: bytes) -> FatLayout:
    """The volume's geometry from its first 512 bytes; Unusable when any value is impossible."""
    if boot[0] not in (0xEB, 0xE9) or boot[510:512] != b"\x55\xaa":
        raise Unusable("FAT: no boot sector (jump instruction or 0x55AA signature missing)")
    bps, spc, rsvd, nfats, root_ents, tot16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", boot, 11)
    (tot32,) = struct.unpack_from("<I", boot, 32)
    if not _power_of_two(bps) or not 512 <= bps <= 4096:
        raise Unusable(f"FAT: bytes per sector {bps} is not a power of two in 512..4096")
    if not _power_of_two(spc):
        raise Unusable(f"FAT: sectors per cluster {spc} is not a power of two")
    if rsvd == 0 or nfats == 0:
        raise Unusable(f"FAT: {rsvd} reserved sectors, {nfats} FATs")
    if media != 0xF0 and media < 0xF8:
        raise Unusable(f"FAT: media byte {media:#04x} is invalid")
    fatsz32, ext_flags, version, root_clus = struct.unpack_from("<IHHI", boot, 36)
    fatsz = fatsz16 or fatsz32
    total = tot16 or tot32
    if total == 0 or fatsz == 0:
        raise Unusable(f"FAT: total sectors {total}, FAT size {fatsz} sectors")
    root_sectors = -(-root_ents * 32 // bps)
    first_data = rsvd + nfats * fatsz + root_sectors
    if first_data >= total:
        raise Unusable(f"FAT: data area starts at sector {first_data}, past the volume's {total} sectors")
    clusters = (total - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if clusters == 0 or clusters > 0x0FFFFFF5:
        raise Unusable(f"FAT: cluster count {clusters} is out of range")
    if (bits == 32) != (fatsz16 == 0) or (bits == 32) != (root_ents == 0):
        raise Unusable(f"FAT: {clusters} clusters make FAT{bits}, but FAT size/root entries fields "
                       f"({fatsz16}, {root_ents}) say otherwise")  # fmt: skip
    active, root, state = 0, 0, boot[37]
    if bits == 32:
        if version != 0:
            raise Unusable(f"FAT32: unknown version {version:#06x}")
        if not 2 <= root_clus <= clusters + 1:
            raise Unusable(f"FAT32: root directory cluster {root_clus} is out of range")
        if ext_flags & 0x80:  # mirroring off: only this copy is kept current
            active = ext_flags & 0x0F
            if active >= nfats:
                raise Unusable(f"FAT32: active FAT {active} of {nfats}")
        root, state = root_clus, boot[65]
    if fatsz * bps * 8 < (clusters + 2) * bits:
        raise Unusable(f"FAT: a FAT of {fatsz} sectors cannot hold {clusters} clusters")
    return FatLayout(bits, bps, bps * spc, rsvd * bps, fatsz * bps, nfats, active, first_data * bps, clusters,
                     total * bps, media, root, bool(state & 1))  # fmt: skip


def _entries(raw: bytes, bits: int) -> np.ndarray:
    """FAT entries (uint32) from the raw bytes of a FAT (FAT12: whole pairs of entries only)."""
    if bits == 12:
        b = np.frombuffer(raw, np.uint8, len(raw) // 3 * 3).reshape(-1, 3).astype(np.uint32)
        out = np.empty(len(b) * 2, np.uint32)
        out[0::2] = b[:, 0] | (b[:, 1] & 0x0F) << 8
        out[1::2] = b[:, 1] >> 4 | b[:, 2] << 4
        return out
    if bits == 16:
        return np.frombuffer(raw, "<u2", len(raw) // 2).astype(np.uint32)
    return np.frombuffer(raw, "<u4", len(raw) // 4) & np.uint32(0x0FFFFFFF)


def _read_entries(area: Area, lay: FatLayout, copy: int, first: int, count: int) -> np.ndarray:
    """Entries first .. first + count - 1 of one FAT copy (`first` even for FAT12)."""
    base = lay.fat_offset + copy * lay.fat_bytes
    if lay.bits == 12:
        start, end = first * 3 // 2, -(-(first + count) * 3 // 2)
        raw = area.read(base + start, end - start)
        return _entries(raw + b"\0" * (-len(raw) % 3), 12)[:count]
    width = lay.bits // 8
    return _entries(area.read(base + first * width, count * width), lay.bits)


@dataclass(frozen=True)
class FatUsage:
    layout: FatLayout
    used: np.ndarray  # bool per data cluster: index i is cluster i + 2
    disagree: int  # clusters free in one FAT copy and used in another
    dirty: bool


def cluster_usage(area: Area) -> FatUsage:
    """Which data clusters are used, from every FAT copy; the checks that make it trustworthy."""
    lay = layout(area.read(0, 512))
    if lay.size > area.size:
        raise Unusable(f"FAT: the volume ({lay.size} bytes) is larger than its area ({area.size} bytes)")
    if lay.fat_offset + lay.fats * lay.fat_bytes > lay.size:
        raise Unusable("FAT: the FATs pass the end of the volume")
    mask = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[lay.bits]
    reserved = mask - 15  # 0x?FF0 and up: reserved values, bad cluster, end of chain
    last = lay.clusters + 1
    head = _read_entries(area, lay, lay.active, 0, 2)
    if head[0] & 0xFF != lay.media:
        raise Unusable(f"FAT: FAT[0] media byte {int(head[0]) & 0xFF:#04x} differs from the BPB's {lay.media:#04x}")
    dirty = lay.dirty
    if lay.bits > 12:
        clean_bit = 1 << (lay.bits - 1 if lay.bits == 16 else 27)
        dirty |= not head[1] & clean_bit
    used = np.zeros(lay.clusters, bool)
    disagree = 0
    step = _CHUNK_ENTRIES if lay.bits == 32 else last + 1
    for first in range(2, last + 1, step):
        count = min(step, last + 1 - first)
        lo = first & ~1  # FAT12 decodes whole entry pairs
        nonzero = []
        for copy in range(lay.fats):
            e = _read_entries(area, lay, copy, lo, count + first - lo)[first - lo :]
            if copy == lay.active:
                bad = (e == 1) | ((e > last) & (e < reserved))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise Unusable(f"FAT: cluster {first + i} points to cluster {int(e[i])}, outside 2..{last}")
            nonzero.append(e != 0)
        chunk = np.logical_or.reduce(nonzero)
        disagree += int(np.count_nonzero(chunk & ~np.logical_and.reduce(nonzero)))
        used[first - 2 : first - 2 + count] = chunk
    if lay.root_cluster and not used[lay.root_cluster - 2]:
        raise Unusable(f"FAT32: the root directory's cluster {lay.root_cluster} is marked free")
    return FatUsage(lay, used, disagree, dirty)


def parse(area: Area) -> str:
    u = cluster_usage(area)
    lay = u.layout
    n = area.heap(lay.data_offset, lay.cluster, u.used)
    desc = f"FAT{lay.bits}, {unit_text(lay.cluster)} clusters, {n} of {lay.clusters} in use"
    if u.disagree:
        desc += f", FAT copies differ on {u.disagree} clusters (kept as used)"
    return desc + (" (dirty)" if u.dirty else "")
