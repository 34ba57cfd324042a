"""Used blocks of ext2, ext3 and ext4, from the superblock (byte 1024), the group descriptor table and
the per-group block bitmaps.

Used: bytes 0-2047 (boot area, superblock); every block (cluster, with bigalloc) a block bitmap of an
initialised group marks; for every group, wherever it lies (flex_bg packs them elsewhere), its block
bitmap, inode bitmap and inode table; the superblock backup, group descriptor blocks and reserved GDT
blocks of every group that has a backup (sparse_super, sparse_super2) and the descriptor blocks of
meta_bg groups; the MMP block; all bytes of the area past the end of the filesystem. A group with
BLOCK_UNINIT (honoured only with gdt_csum/metadata_csum, as the kernel does) has no bitmap on disk:
it uses nothing but that metadata.

Unusable when: the magic is not 0xEF53; the volume is an external journal (journal_dev); the journal
needs replaying (needs_recovery); an incompat feature other than filetype, meta_bg, extents, 64bit,
mmp, flex_bg, ea_inode, dirdata, metadata_csum_seed, large_dir, inline_data, encrypt, casefold is set,
or a ro_compat one other than sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink,
extra_isize, quota, bigalloc, metadata_csum, readonly, project, shared_blocks, verity, orphan_present;
the state has the error bit or lacks the clean bit (ext2 mounted; a journalled ext3/4 mounted shows
needs_recovery instead); the geometry is inconsistent (block, cluster, group, inode or descriptor size,
first data block, inode count != groups x inodes per group); the filesystem is larger than the area;
with metadata_csum, the superblock checksum, a group descriptor checksum or the block bitmap checksum
of an initialised group fails (crc32c); with gdt_csum, a group descriptor checksum (crc16) fails; a
descriptor block, a group's bitmap or inode table, or the MMP block lies outside the filesystem; the
zero bits of an initialised group's block bitmap disagree with its free count.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import Area, Unusable
from .crc import crc32c_raw, crc32c_rows

MAGIC = 0xEF53

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200

INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_CSUM_SEED = 0x2000
# filetype, meta_bg, extents, 64bit, mmp, flex_bg, ea_inode, dirdata, csum_seed, largedir, inline_data,
# encrypt, casefold: none changes what the block bitmaps mean.
INCOMPAT_KNOWN = 0x2 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x30000

RO_SPARSE_SUPER = 0x1
RO_HUGE_FILE = 0x8
RO_GDT_CSUM = 0x10
RO_DIR_NLINK = 0x20
RO_EXTRA_ISIZE = 0x40
RO_BIGALLOC = 0x200
RO_METADATA_CSUM = 0x400
# Left out on purpose: has_snapshot (0x80, next3 snapshots) and replica (0x800): blocks those own may not
# follow the bitmaps' usual meaning.
RO_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x18000

STATE_VALID = 0x1
STATE_ERROR = 0x2

BG_BLOCK_UNINIT = 0x2

# Bitmap bytes read and checksummed at once (the checksum costs a numpy step per byte column, so wide
# batches are cheaper), and decoded at once (16 Mi bools): memory stays bounded on huge filesystems.
CHECK_BYTES = 16 << 20
UNPACK_BYTES = 2 << 20
READ_RUN = 1024  # at most this many adjacent bitmap blocks in one read


def _crc_table(poly: int) -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(poly), t >> 1).astype(np.uint32)
    return t


CRC16 = _crc_table(0xA001)
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def crc_update(table: np.ndarray, crc: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Raw reflected CRC (no pre- or post-inversion, as ext4's checksums are) of every row of `data`
    (n x L bytes) from the start values `crc` (n): one table step per column over all rows at once, so
    thousands of descriptors cost L numpy operations, not L times their number. For crc16 (gdt_csum),
    which no dependency offers; crc32c comes from .crc."""
    out = np.asarray(crc, np.uint32).copy()
    cols = np.ascontiguousarray(np.asarray(data, np.uint8).T)
    for col in cols:
        out = table[(out ^ col) & 0xFF] ^ (out >> 8)
    return out


def _le(raw: np.ndarray, offset: int, size: int) -> np.ndarray:
    """A little-endian field of every row of `raw` (n x desc_size bytes) as int64."""
    dt = {2: "<u2", 4: "<u4"}[size]
    return np.ascontiguousarray(raw[:, offset : offset + size]).view(dt).ravel().astype(np.int64)


@dataclass
class Geometry:
    kind: str
    block_size: int
    ratio: int  # blocks per cluster (1 without bigalloc)
    first_data_block: int
    blocks: int
    blocks_per_group: int
    clusters_per_group: int
    groups: int
    clusters: int
    desc_size: int
    itable_blocks: int
    incompat: int
    ro_compat: int
    compat: int
    reserved_gdt: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    csum_seed: int
    uuid: bytes
    mmp_block: int
    used_clusters: int = 0

    @property
    def sb_block(self) -> int:
        return 1024 // self.block_size

    def group_first_block(self, g: np.ndarray) -> np.ndarray:
        return self.first_data_block + g * self.blocks_per_group

    def has_super(self, g: np.ndarray) -> np.ndarray:
        """Groups holding a superblock backup (and, outside meta_bg, a copy of the descriptor table)."""
        if self.compat & COMPAT_SPARSE_SUPER2:
            b0, b1 = self.backup_bgs
            return np.asarray((g == 0) | ((g == b0) & (b0 != 0)) | ((g == b1) & (b1 != 0)), bool)
        if not self.ro_compat & RO_SPARSE_SUPER:
            return np.ones(len(g), bool)
        hs = g <= 1
        for base in (3, 5, 7):
            p = base
            while p < self.groups:
                hs |= g == p
                p *= base
        return hs


def superblock(area: Area) -> Geometry:
    if area.size < 2048:
        raise Unusable("area too small for an ext2/3/4 superblock")
    sb = area.read(1024, 1024)

    def u32(o: int) -> int:
        return int(struct.unpack_from("<I", sb, o)[0])

    def u16(o: int) -> int:
        return int(struct.unpack_from("<H", sb, o)[0])

    if u16(0x38) != MAGIC:
        raise Unusable("no ext2/3/4 superblock (bad magic)")
    compat, incompat, ro = u32(0x5C), u32(0x60), u32(0x64)
    if ro & RO_METADATA_CSUM:
        if sb[0x175] != 1:
            raise Unusable(f"unknown metadata checksum type {sb[0x175]}")
        if crc32c_raw(0xFFFFFFFF, sb[:0x3FC]) != u32(0x3FC):
            raise Unusable("superblock checksum mismatch")
    if incompat & INCOMPAT_JOURNAL_DEV:
        raise Unusable("this volume is an ext3/4 external journal device, not a filesystem")
    if incompat & INCOMPAT_RECOVER:
        raise Unusable("the journal needs replaying (needs_recovery): allocation info may be stale")
    if incompat & ~INCOMPAT_KNOWN:
        raise Unusable(f"unknown incompatible feature bits 0x{incompat & ~INCOMPAT_KNOWN:x}")
    if ro & ~RO_KNOWN:
        raise Unusable(f"unsupported read-only-compatible feature bits 0x{ro & ~RO_KNOWN:x}")
    state = u16(0x3A)
    if state & STATE_ERROR:
        raise Unusable("the filesystem has errors (state error bit set): run e2fsck")
    if not state & STATE_VALID:
        raise Unusable("the filesystem was not cleanly unmounted (state not clean)")

    log_bs, log_cs = u32(0x18), u32(0x1C)
    if log_bs > 6:
        raise Unusable(f"block size 2^{10 + log_bs} out of range")
    bs = 1024 << log_bs
    bpg, cpg, ipg = u32(0x20), u32(0x24), u32(0x28)
    bigalloc = bool(ro & RO_BIGALLOC)
    if bigalloc:
        if not log_bs <= log_cs <= log_bs + 16:
            raise Unusable(f"cluster size 2^{10 + log_cs} out of range")
        ratio = 1 << (log_cs - log_bs)
    else:
        ratio = 1
        if cpg != bpg:  # the old fragments-per-group field; always equal without bigalloc
            raise Unusable(f"clusters per group {cpg} != blocks per group {bpg}")
    if not 0 < cpg <= 8 * bs or cpg % 8 or bpg != cpg * ratio:
        raise Unusable(f"inconsistent group size ({bpg} blocks, {cpg} clusters per group)")
    fdb = u32(0x14)
    if fdb != (1 if bs == 1024 and not bigalloc else 0):
        raise Unusable(f"unexpected first data block {fdb}")
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks = u32(0x4) | (u32(0x150) << 32 if is64 else 0)
    if blocks <= fdb:
        raise Unusable(f"block count {blocks} too small")
    if blocks * bs > area.size:
        raise Unusable(f"filesystem ({blocks * bs} bytes) is larger than its area ({area.size} bytes)")
    groups = -(-(blocks - fdb) // bpg)
    if ipg == 0 or u32(0x0) != groups * ipg:
        raise Unusable(f"inode count {u32(0x0)} != {groups} groups x {ipg} inodes")
    inode_size = u16(0x58) if u32(0x4C) >= 1 else 128
    if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
        raise Unusable(f"bad inode size {inode_size}")
    desc_size = u16(0xFE) if is64 else 32
    if desc_size < (64 if is64 else 32) or desc_size > 1024 or desc_size & (desc_size - 1):
        raise Unusable(f"bad group descriptor size {desc_size}")
    uuid = sb[0x68:0x78]
    seed = u32(0x270) if incompat & INCOMPAT_CSUM_SEED else crc32c_raw(0xFFFFFFFF, uuid)
    ext4ish = incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) or ro & (
        RO_HUGE_FILE | RO_GDT_CSUM | RO_DIR_NLINK | RO_EXTRA_ISIZE | RO_METADATA_CSUM | RO_BIGALLOC
    )
    kind = "ext4" if ext4ish else "ext3" if compat & COMPAT_HAS_JOURNAL else "ext2"
    return Geometry(
        kind=kind, block_size=bs, ratio=ratio, first_data_block=fdb, blocks=blocks, blocks_per_group=bpg,
        clusters_per_group=cpg, groups=groups, clusters=-(-(blocks - fdb) // ratio), desc_size=desc_size,
        itable_blocks=-(-ipg * inode_size // bs), incompat=incompat, ro_compat=ro, compat=compat,
        reserved_gdt=u16(0xCE), first_meta_bg=u32(0x104), backup_bgs=(u32(0x24C), u32(0x250)),
        csum_seed=seed, uuid=uuid, mmp_block=struct.unpack_from("<Q", sb, 0x168)[0] if incompat & INCOMPAT_MMP else 0,
    )  # fmt: skip


def _descriptor_blocks(geo: Geometry) -> tuple[np.ndarray, int]:
    """Block numbers of the descriptor table's blocks, and how many of them sit right after the superblock."""
    per_block = geo.block_size // geo.desc_size
    needed = -(-geo.groups // per_block)
    classic = needed
    if geo.incompat & INCOMPAT_META_BG:
        if geo.first_meta_bg > needed:
            raise Unusable(f"first meta_bg {geo.first_meta_bg} past the {needed} descriptor blocks")
        classic = geo.first_meta_bg
    locs = [geo.sb_block + 1 + i for i in range(classic)]
    if needed > classic:
        nr = np.arange(classic, needed, dtype=np.int64)
        first = nr * per_block
        loc = geo.group_first_block(first) + geo.has_super(first)
        if geo.block_size == 1024 and geo.first_data_block == 0:
            loc = loc + (nr == 0)
        locs += loc.tolist()
    out = np.array(locs, np.int64)
    if len(out) and (out.max() >= geo.blocks):
        raise Unusable("a group descriptor block lies outside the filesystem")
    return out, classic


def _descriptors(area: Area, geo: Geometry) -> np.ndarray:
    bs = geo.block_size
    locs, classic = _descriptor_blocks(geo)
    parts = [area.read(int(locs[0]) * bs, classic * bs)] if classic else []
    parts += [area.read(int(b) * bs, bs) for b in locs[classic:]]
    raw = np.frombuffer(b"".join(parts), np.uint8)[: geo.groups * geo.desc_size]
    return raw.reshape(geo.groups, geo.desc_size)


def _check_descriptor_csums(geo: Geometry, raw: np.ndarray) -> None:
    n = geo.groups
    le_group = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4)
    stored = _le(raw, 0x1E, 2)
    if geo.ro_compat & RO_METADATA_CSUM:
        body = raw.copy()
        body[:, 0x1E:0x20] = 0
        calc = crc32c_rows(geo.csum_seed, np.hstack([le_group, body])) & 0xFFFF
        name = "crc32c"
    elif geo.ro_compat & RO_GDT_CSUM:
        start = crc_update(CRC16, np.array([0xFFFF], np.uint32), np.frombuffer(geo.uuid, np.uint8)[None, :])
        tail = raw[:, 0x20:] if geo.incompat & INCOMPAT_64BIT else raw[:, :0]
        crc = crc_update(CRC16, np.full(n, start[0], np.uint32), np.hstack([le_group, raw[:, :0x1E], tail]))
        calc = crc.astype(np.int64) & 0xFFFF
        name = "crc16"
    else:
        return
    bad = np.flatnonzero(calc != stored)
    if len(bad):
        raise Unusable(f"group descriptor checksum ({name}) mismatch in group {int(bad[0])} ({len(bad)} groups)")


def _base_metadata(geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Superblock backups, descriptor blocks and reserved GDT blocks of every group: (first block, count)."""
    g = np.arange(geo.groups, dtype=np.int64)
    hs = geo.has_super(g)
    start = geo.group_first_block(g)
    per_block = geo.block_size // geo.desc_size
    meta = bool(geo.incompat & INCOMPAT_META_BG)
    classic_groups = geo.first_meta_bg * per_block if meta else geo.groups
    old_desc = geo.first_meta_bg if meta else -(-geo.groups // per_block)
    count = np.where(hs, 1 + old_desc + geo.reserved_gdt, 0)
    if meta:
        in_meta = g >= classic_groups
        pos = g % per_block
        has_desc = in_meta & ((pos == 0) | (pos == 1) | (pos == per_block - 1))
        count = np.where(in_meta, hs.astype(np.int64) + has_desc, count)
        if geo.block_size == 1024 and geo.first_data_block == 0:
            count = count + (in_meta & (g == 0))
    # Group 0's superblock sits at byte 1024, which with 1 KiB blocks and first_data_block 0 is block 1.
    count[0] += geo.sb_block - geo.first_data_block
    return start, count


def walk(area: Area, geo: Geometry, clusters: Callable[[np.ndarray, np.ndarray], None],
         blocks: Callable[[np.ndarray, np.ndarray], None]) -> None:  # fmt: skip
    """Check the filesystem past its superblock and report what it uses: `clusters(starts, ends)` for
    runs [start, end) of clusters the bitmaps mark (cluster c covers blocks first_data_block + c * ratio
    onwards), `blocks(starts, counts)` for runs of metadata blocks. Raises Unusable (see the module
    docstring)."""
    raw = _descriptors(area, geo)
    _check_descriptor_csums(geo, raw)
    is64 = bool(geo.incompat & INCOMPAT_64BIT)

    def wide(lo: int, hi: int, size: int) -> np.ndarray:
        v = _le(raw, lo, size)
        return v | (_le(raw, hi, size) << (8 * size)) if is64 else v

    bbitmap, ibitmap, itable = wide(0x0, 0x20, 4), wide(0x4, 0x24, 4), wide(0x8, 0x28, 4)
    free = wide(0xC, 0x2C, 2)
    flags = _le(raw, 0x12, 2)
    for what, loc, n in (("block bitmap", bbitmap, 1), ("inode bitmap", ibitmap, 1),
                         ("inode table", itable, geo.itable_blocks)):  # fmt: skip
        bad = np.flatnonzero((loc < geo.first_data_block) | (loc + n > geo.blocks))
        if len(bad):
            g = int(bad[0])
            raise Unusable(f"group {g}'s {what} at block {int(loc[g])} lies outside the filesystem "
                           f"({geo.blocks} blocks)")  # fmt: skip

    start, count = _base_metadata(geo)
    metas = [start, bbitmap, ibitmap, itable]
    one = np.ones(geo.groups, np.int64)
    counts = [count, one, one, np.full(geo.groups, geo.itable_blocks, np.int64)]
    if geo.mmp_block:
        if not geo.first_data_block <= geo.mmp_block < geo.blocks:
            raise Unusable(f"MMP block {geo.mmp_block} lies outside the filesystem")
        metas.append(np.array([geo.mmp_block]))
        counts.append(np.array([1]))
    ms, mc = np.concatenate(metas), np.concatenate(counts)
    mc = np.minimum(mc, geo.blocks - ms)
    blocks(ms[mc > 0], mc[mc > 0])

    csum = bool(geo.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM))
    uninit = (flags & BG_BLOCK_UNINIT).astype(bool) & csum
    cpg = geo.clusters_per_group
    nbytes = cpg // 8
    valid = np.minimum(cpg, geo.clusters - np.arange(geo.groups, dtype=np.int64) * cpg)
    geo.used_clusters = int(geo.clusters - free.sum())
    bs = geo.block_size
    step, sub = max(1, CHECK_BYTES // nbytes), max(1, UNPACK_BYTES // nbytes)
    init_all = np.flatnonzero(~uninit)
    for i0 in range(0, len(init_all), step):
        init = init_all[i0 : i0 + step]
        packed = np.empty((len(init), nbytes), np.uint8)
        loc = bbitmap[init]
        order = np.argsort(loc, kind="stable")
        breaks = np.flatnonzero((np.diff(loc[order]) != 1) | (np.arange(1, len(order)) % READ_RUN == 0)) + 1
        for run in np.split(order, breaks):
            data = np.frombuffer(area.read(int(loc[run[0]]) * bs, len(run) * bs), np.uint8).reshape(len(run), bs)
            packed[run] = data[:, :nbytes]
        if geo.ro_compat & RO_METADATA_CSUM:
            calc = crc32c_rows(geo.csum_seed, packed)
            stored = _le(raw[init], 0x18, 2)
            if geo.desc_size >= 0x3C:
                stored |= _le(raw[init], 0x38, 2) << 16
            else:
                calc &= 0xFFFF
            bad = np.flatnonzero(calc != stored)
            if len(bad):
                raise Unusable(f"block bitmap checksum mismatch in group {int(init[bad[0]])} ({len(bad)} groups)")
        if valid[init[-1]] < cpg:  # only the last group can be short: its padding bits are no clusters
            row = np.unpackbits(packed[-1], bitorder="little")
            row[valid[init[-1]] :] = 0
            packed[-1] = np.packbits(row, bitorder="little")
        zeros = valid[init] - POPCOUNT[packed].sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero(zeros != free[init])
        if len(bad):
            g = int(init[bad[0]])
            raise Unusable(f"group {g}'s block bitmap has {int(zeros[bad[0]])} free clusters, "
                           f"its descriptor says {int(free[g])}")  # fmt: skip
        for j in range(0, len(init), sub):
            part = packed[j : j + sub]
            if not part.any():
                continue
            # One spare clear bit per group keeps runs from joining groups that are not adjacent.
            bits = np.zeros((len(part), cpg + 1), bool)
            bits[:, :cpg] = np.unpackbits(part, axis=1, bitorder="little").view(bool)
            s, e = _runs(bits.reshape(-1))
            row_of = s // (cpg + 1)
            shift = init[j : j + sub][row_of] * cpg - row_of * (cpg + 1)
            clusters(s + shift, e + shift)


def _runs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every run of True in a flat bool array."""
    bounds = np.concatenate(([0], np.flatnonzero(bits[1:] != bits[:-1]) + 1, [len(bits)]))
    on = bits[bounds[:-1]]
    return bounds[:-1][on], bounds[1:][on]


def parse(area: Area) -> str:
    starts: list[np.ndarray] = [np.array([0], np.int64)]  # boot area and superblock
    lengths: list[np.ndarray] = [np.array([2048], np.int64)]

    def clusters(first: np.ndarray, end: np.ndarray) -> None:
        s = first * unit + base
        starts.append(s)
        lengths.append(np.minimum(end * unit + base, fs_end) - s)

    def blocks(first: np.ndarray, counts: np.ndarray) -> None:
        starts.append(first * bs)
        lengths.append(counts * bs)

    geo = superblock(area)
    bs, unit = geo.block_size, geo.block_size * geo.ratio
    base, fs_end = geo.first_data_block * bs, geo.blocks * bs
    walk(area, geo, clusters, blocks)
    # Marked once at the end: each mark costs a pass over the whole map, and nothing is marked when refused.
    starts.append(np.array([fs_end], np.int64))  # raw bytes past the filesystem's end
    lengths.append(np.array([area.size - fs_end], np.int64))
    area.used_runs(np.concatenate(starts), np.concatenate(lengths))
    size = f"{geo.block_size // 1024} KiB"
    what = f"{size} blocks" if geo.ratio == 1 else f"{size} blocks in {unit // 1024} KiB clusters"
    units_name = "blocks" if geo.ratio == 1 else "clusters"
    return f"{geo.kind}, {what}, {geo.used_clusters} of {geo.clusters} {units_name} in use"


def used_blocks(area: Area) -> np.ndarray:
    """Per filesystem block 0 .. block count - 1: used? (The property tests compare this with dumpe2fs.)"""
    geo = superblock(area)
    starts: list[np.ndarray] = [np.array([0], np.int64)]  # boot area and superblock: bytes 0-2047
    ends: list[np.ndarray] = [np.array([-(-2048 // geo.block_size)], np.int64)]

    def clusters(first: np.ndarray, end: np.ndarray) -> None:
        starts.append(geo.first_data_block + first * geo.ratio)
        ends.append(np.minimum(geo.first_data_block + end * geo.ratio, geo.blocks))

    def blocks(first: np.ndarray, counts: np.ndarray) -> None:
        starts.append(first)
        ends.append(first + counts)

    walk(area, geo, clusters, blocks)
    diff = np.zeros(geo.blocks + 1, np.int64)
    np.add.at(diff, np.concatenate(starts), 1)
    np.add.at(diff, np.concatenate(ends), -1)
    return np.asarray(np.cumsum(diff[:-1]) > 0)
