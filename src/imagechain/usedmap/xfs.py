"""XFS (v4 and v5/CRC): which filesystem blocks hold something, from the free-space B+trees by block
number (bnobt) of every allocation group. A block is unused only when a bnobt leaf lists it as free;
everything else (AG headers, the AGFL, every btree, inodes, the internal log, file data) counts as used,
and so do the bytes of the area past sb_dblocks.

Structures read (all big-endian): the primary superblock (sector 0), each AG's AGF (sector 1) and AGFL
(sector 3, v5 header only), the bnobt blocks (short-form btree headers, "AB3B"/"ABTB"), and the internal
log's record headers (to prove the log clean: on-disk btrees lag the log until it is replayed).

Unusable is raised for: a bad magic or version on the superblock, an AGF, the AGFL (v5) or a bnobt
block; a CRC32C mismatch on any of them (v5); a superblock geometry that does not add up, mkfs in
progress, a realtime section, an unknown or "needs repair" incompatible feature, an unknown read-only
compatible feature, any log-incompatible feature; a filesystem larger than the area; an AGF whose
sequence number, length, tree root/levels, free-list count or uuid disagree; a bnobt block whose level,
record count, owner, disk address, uuid or sibling links disagree, keys that disagree with their child,
free extents out of order, overlapping, empty or outside the AG, a sum of free extents other than
agf_freeblks, a longest extent other than agf_longest; and an internal log that is not provably clean
(its last record before the head is not a clean unmount record ending exactly at the head, or the
cycle numbers around the head are not the plain two-cycle pattern a quiesced log leaves). A frozen
filesystem's log is covered, not unmounted: it counts as dirty (xfs_logprint and xfs_repair agree).
An external log cannot be checked from the data device and is accepted; the description says so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import Area, Unusable
from .crc import crc32c

NULLAGBLOCK = 0xFFFFFFFF
BB = 512  # the log's basic block
LOG_MAGIC = 0xFEEDBABE
XLOG_UNMOUNT_TRANS = 0x20
XFS_LOG_CLIENT = 0xAA
UNMOUNT_MAGIC = 0x556E
IN_FLIGHT_BBS = 4096  # up to 8 in-flight iclogs of 256 KiB: holes in the cycle numbers lie this close to the head

INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # ftype spinodes meta_uuid bigtime nrext64 exchrange parent
INCOMPAT_NEEDSREPAIR = 0x10
INCOMPAT_META_UUID = 0x4
RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8  # finobt rmapbt reflink inobtcnt
V4_SHAREDBIT = 0x0200
V4_LOGV2BIT = 0x0400


def _check_crc(buf: bytes, off: int, what: str) -> None:
    stored = int.from_bytes(buf[off : off + 4], "little")
    if crc32c(buf[:off] + b"\0\0\0\0" + buf[off + 4 :]) != stored:
        raise Unusable(f"xfs {what}: checksum mismatch")


@dataclass(frozen=True)
class Geometry:
    version: int  # 4 or 5
    blocksize: int
    sectsize: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    logstart: int  # filesystem block number (agno << agblklog | agbno); 0: external log
    logblocks: int
    uuid: bytes  # what AG headers and btree blocks carry (sb_meta_uuid with the meta_uuid feature)
    log_uuid: bytes  # what log record headers carry (sb_uuid)
    logv2: bool

    def ag_length(self, agno: int) -> int:
        return self.agblocks if agno < self.agcount - 1 else self.dblocks - agno * self.agblocks

    def ag_offset(self, agno: int, agbno: int = 0) -> int:
        """Byte offset of an AG block: AG numbers are not contiguous in fs block numbers, but on disk they are."""
        return (agno * self.agblocks + agbno) * self.blocksize


def read_superblock(area: Area) -> Geometry:
    sb = area.read(0, 512)
    if sb[:4] != b"XFSB":
        raise Unusable("xfs superblock: bad magic")
    (blocksize, dblocks, rblocks, rextents, uuid, logstart) = struct.unpack_from(">IQQQ16sQ", sb, 4)
    agblocks, agcount, _rbmblocks, logblocks, versionnum, sectsize = struct.unpack_from(">IIIIHH", sb, 84)
    blocklog, sectlog, _inodelog, _inopblog, agblklog, _rextslog, inprogress = struct.unpack_from(">7B", sb, 120)
    version = versionnum & 0xF
    if version not in (4, 5):
        raise Unusable(f"xfs superblock version {version} is not supported")
    if not (512 <= sectsize <= 32768 and sectsize == 1 << sectlog):
        raise Unusable(f"xfs superblock: bad sector size {sectsize}")
    if not (512 <= blocksize <= 65536 and blocksize == 1 << blocklog and blocksize >= sectsize):
        raise Unusable(f"xfs superblock: bad block size {blocksize}")
    if sectsize > 512:
        sb = area.read(0, sectsize)
    meta_uuid = uuid
    if version == 5:
        _check_crc(sb, 224, "superblock")
        incompat, log_incompat = struct.unpack_from(">II", sb, 216)
        (ro_compat,) = struct.unpack_from(">I", sb, 212)
        if incompat & INCOMPAT_NEEDSREPAIR:
            raise Unusable("xfs filesystem is marked as needing repair")
        if incompat & ~INCOMPAT_KNOWN:
            raise Unusable(f"xfs: unknown incompatible features 0x{incompat & ~INCOMPAT_KNOWN:x}")
        if ro_compat & ~RO_COMPAT_KNOWN:
            raise Unusable(f"xfs: unknown read-only compatible features 0x{ro_compat & ~RO_COMPAT_KNOWN:x}")
        if log_incompat:
            raise Unusable(f"xfs log is dirty (not cleanly unmounted): log-incompatible features 0x{log_incompat:x}")
        if incompat & INCOMPAT_META_UUID:
            meta_uuid = sb[248:264]
        logv2 = True
    else:
        if versionnum & V4_SHAREDBIT:
            raise Unusable("xfs: shared v4 filesystems are not supported")
        logv2 = bool(versionnum & V4_LOGV2BIT)
    if inprogress:
        raise Unusable("xfs: mkfs did not finish (sb_inprogress set)")
    if rblocks or rextents:
        raise Unusable("xfs realtime section not supported")
    if not agblocks or not agcount or agblklog != max(agblocks - 1, 1).bit_length() or agblklog > 31:
        raise Unusable("xfs superblock: bad allocation group geometry")
    if not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise Unusable(f"xfs superblock: {dblocks} blocks do not fit {agcount} AGs of {agblocks}")
    if dblocks * blocksize > area.size:
        raise Unusable(f"xfs claims {dblocks * blocksize} bytes but the area has {area.size}")
    return Geometry(version, blocksize, sectsize, dblocks, agblocks, agcount, agblklog, logstart, logblocks,
                    meta_uuid, uuid, logv2)  # fmt: skip


def _read_agf(area: Area, g: Geometry, agno: int) -> tuple[int, int, int, int, int]:
    """(bnobt root, bnobt levels, free blocks, longest free extent, free-list count) of one AG."""
    agf = area.read(g.ag_offset(agno) + g.sectsize, g.sectsize)
    what = f"AG {agno} AGF"
    if agf[:4] != b"XAGF":
        raise Unusable(f"xfs {what}: bad magic")
    version, seqno, length, bno_root, _cnt_root, _rmap_root, bno_level = struct.unpack_from(">7I", agf, 4)
    flfirst, fllast, flcount, freeblks, longest = struct.unpack_from(">5I", agf, 40)
    if g.version == 5:
        _check_crc(agf, 216, what)
        if agf[64:80] != g.uuid:
            raise Unusable(f"xfs {what}: uuid differs from the superblock's")
    if version != 1 or seqno != agno or length != g.ag_length(agno):
        raise Unusable(f"xfs {what}: version, sequence number or length disagrees with the superblock")
    if not 1 <= bno_level <= 16 or not 0 < bno_root < length:
        raise Unusable(f"xfs {what}: bad free-space btree root {bno_root} / levels {bno_level}")
    agfl_size = (g.sectsize - (36 if g.version == 5 else 0)) // 4
    if flcount > agfl_size or (flcount and (flfirst >= agfl_size or fllast >= agfl_size)):
        raise Unusable(f"xfs {what}: bad free-list indices")
    if freeblks > length or longest > freeblks:
        raise Unusable(f"xfs {what}: free block counts exceed the AG")
    if g.version == 5:
        agfl = area.read(g.ag_offset(agno) + 3 * g.sectsize, g.sectsize)
        if agfl[:4] != b"XAFL" or struct.unpack_from(">I", agfl, 4)[0] != agno:
            raise Unusable(f"xfs AG {agno} AGFL: bad magic or sequence number")
        _check_crc(agfl, 32, f"AG {agno} AGFL")
    return bno_root, bno_level, freeblks, longest, flcount


def _walk_bnobt(area: Area, g: Geometry, agno: int, root: int, levels: int, length: int) -> np.ndarray:
    """Every (startblock, blockcount) record of the bnobt, in key order, as an (n, 2) int64 array."""
    crc = g.version == 5
    hdr = 56 if crc else 16
    magic = b"AB3B" if crc else b"ABTB"
    leaf_max = (g.blocksize - hdr) // 8
    node_max = (g.blocksize - hdr) // 12
    level_blocks = [root]
    expect_first: list[int | None] = [None]  # the key each block's first record must carry
    leaves: list[np.ndarray] = []
    visited = 0
    for level in range(levels - 1, -1, -1):
        next_blocks: list[int] = []
        next_first: list[int | None] = []
        for i, agbno in enumerate(level_blocks):
            visited += 1
            if visited > length:
                raise Unusable(f"xfs AG {agno} free-space btree has more blocks than the AG")
            where = f"xfs AG {agno} free-space btree block {agbno}"
            if not 0 < agbno < length:
                raise Unusable(f"{where}: outside the AG")
            buf = area.read(g.ag_offset(agno, agbno), g.blocksize)
            if buf[:4] != magic:
                raise Unusable(f"{where}: bad magic")
            blevel, numrecs, left, right = struct.unpack_from(">HHII", buf, 4)
            if crc:
                _check_crc(buf, 52, f"AG {agno} free-space btree block {agbno}")
                blkno, _lsn, uuid, owner = struct.unpack_from(">QQ16sI", buf, 16)
                if blkno * BB != g.ag_offset(agno, agbno) or owner != agno or uuid != g.uuid:
                    raise Unusable(f"{where}: disk address, owner or uuid disagrees")
            want_left = level_blocks[i - 1] if i else NULLAGBLOCK
            want_right = level_blocks[i + 1] if i + 1 < len(level_blocks) else NULLAGBLOCK
            if blevel != level or left != want_left or right != want_right:
                raise Unusable(f"{where}: level or sibling links disagree with the tree")
            if numrecs > (node_max if level else leaf_max) or (numrecs == 0 and not (level == 0 and levels == 1)):
                raise Unusable(f"{where}: bad record count {numrecs}")
            keys = np.frombuffer(buf, ">u4", numrecs * 2, hdr).astype(np.int64).reshape(-1, 2)
            if numrecs and expect_first[i] is not None and keys[0, 0] != expect_first[i]:
                raise Unusable(f"{where}: first key disagrees with its parent")
            if level:
                ptrs = np.frombuffer(buf, ">u4", numrecs, hdr + node_max * 8).astype(np.int64)
                if numrecs > 1 and (np.diff(keys[:, 0]) <= 0).any():
                    raise Unusable(f"{where}: keys out of order")
                next_blocks.extend(ptrs.tolist())
                next_first.extend(keys[:, 0].tolist())
            else:
                leaves.append(keys)
        level_blocks, expect_first = next_blocks, next_first
    recs = np.concatenate(leaves) if leaves else np.zeros((0, 2), np.int64)
    if len(recs):
        start, count = recs[:, 0], recs[:, 1]
        if (count <= 0).any() or (start <= 0).any() or (start + count > length).any():
            raise Unusable(f"xfs AG {agno}: a free extent is empty or lies outside the AG")
        if (start[1:] < start[:-1] + count[:-1]).any():
            raise Unusable(f"xfs AG {agno}: free extents out of order or overlapping")
    return recs


def free_extents(area: Area) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """(geometry, first block, block count) of every free extent, as linear block numbers (block b at
    byte b * blocksize). Proves the log clean first: a dirty log's changes are not yet in the btrees."""
    g = read_superblock(area)
    if g.logstart:
        check_log_clean(area, g)
    starts, counts = [], []
    for agno in range(g.agcount):
        length = g.ag_length(agno)
        root, levels, freeblks, longest, _flcount = _read_agf(area, g, agno)
        recs = _walk_bnobt(area, g, agno, root, levels, length)
        total = int(recs[:, 1].sum()) if len(recs) else 0
        top = int(recs[:, 1].max()) if len(recs) else 0
        if total != freeblks:
            raise Unusable(f"xfs AG {agno}: free extents sum to {total} blocks, the AGF says {freeblks}")
        if top != longest:
            raise Unusable(f"xfs AG {agno}: longest free extent is {top} blocks, the AGF says {longest}")
        starts.append(recs[:, 0] + agno * g.agblocks)
        counts.append(recs[:, 1])
    return g, np.concatenate(starts), np.concatenate(counts)


def used_blocks(area: Area) -> np.ndarray:
    """One bool per filesystem block (True: used): the unit-level view the tests compare with xfs_db."""
    g, starts, counts = free_extents(area)
    used = np.ones(g.dblocks, bool)
    d = np.zeros(g.dblocks + 1, np.int64)
    np.add.at(d, starts, 1)
    np.add.at(d, starts + counts, -1)
    used[np.cumsum(d[:-1]) > 0] = False
    return used


def parse(area: Area) -> str:
    g, starts, counts = free_extents(area)
    # used runs are the gaps between free extents (sorted: AGs in order, each AG's records in order)
    ends = starts + counts
    run_start = np.concatenate(([0], ends))
    run_end = np.concatenate((starts, [g.dblocks]))
    keep = run_end > run_start
    bs = g.blocksize
    area.used_runs(run_start[keep] * bs, (run_end[keep] - run_start[keep]) * bs)
    fs_bytes = g.dblocks * bs
    if area.size > fs_bytes:
        area.used(fs_bytes, area.size - fs_bytes)
    free = int(counts.sum())
    log = "" if g.logstart else ", external log not checked"
    return (f"xfs v{g.version}, {bs // 1024} KiB blocks, {g.dblocks - free} of {g.dblocks} in use, "
            f"{g.agcount} AGs{log}")  # fmt: skip


# --- the internal log --------------------------------------------------------------------------------


class _Log:
    """The internal log as 512-byte basic blocks, each stamped with the cycle of the pass that wrote it."""

    def __init__(self, area: Area, g: Geometry) -> None:
        agno, agbno = g.logstart >> g.agblklog, g.logstart & ((1 << g.agblklog) - 1)
        if agno >= g.agcount or agbno + g.logblocks > g.ag_length(agno) or not g.logblocks:
            raise Unusable("xfs superblock: the internal log lies outside its AG")
        self.area, self.base = area, g.ag_offset(agno, agbno)
        self.n = g.logblocks * g.blocksize // BB

    def read(self, first: int, count: int) -> bytes:
        return self.area.read(self.base + first * BB, count * BB)

    def cycles(self, first: int, count: int) -> np.ndarray:
        """Cycle numbers of blocks [first, first + count): a record header holds its cycle after the magic."""
        words = np.frombuffer(self.read(first, count), ">u4").reshape(count, BB // 4)
        return np.where(words[:, 0] == LOG_MAGIC, words[:, 1], words[:, 0]).astype(np.int64)


def check_log_clean(area: Area, g: Geometry) -> None:
    """Raise Unusable unless the log's last record before its head is a clean unmount record.

    The head is where the cycle number drops (binary search, as log recovery does); the blocks on either
    side, as far as in-flight writes could reach, must carry exactly the two cycles a quiesced log leaves.
    The record ending at the head must be one unmount operation (XLOG_UNMOUNT_TRANS) whose tail is itself or
    the record before it: everything logged earlier was written back before it was written."""
    log = _Log(area, g)
    n = log.n

    def dirty(why: str) -> Unusable:
        return Unusable(f"xfs log is dirty (not cleanly unmounted): {why}")

    c_first, c_last = int(log.cycles(0, 1)[0]), int(log.cycles(n - 1, 1)[0])
    if c_first == c_last:
        head, c_rec = n, c_first  # the last pass ended exactly at the end of the log
        after = log.cycles(0, min(n, IN_FLIGHT_BBS))
        if (after != c_rec).any():
            raise dirty("cycle numbers at the start of the log are not uniform")
    elif c_first == c_last + 1:
        lo, hi = 0, n - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(log.cycles(mid, 1)[0]) == c_last:
                hi = mid
            else:
                lo = mid
        head, c_rec = hi, c_first
        after = log.cycles(head, min(n - head, IN_FLIGHT_BBS))
        if (after != c_last).any():
            raise dirty(f"cycle numbers after the head (block {head}) are not uniform")
    else:
        raise dirty(f"unexpected cycle numbers {c_first} and {c_last} at the ends of the log")
    w0 = max(0, head - IN_FLIGHT_BBS)
    before = log.read(w0, head - w0)
    words = np.frombuffer(before, ">u4").reshape(-1, BB // 4)
    cyc = np.where(words[:, 0] == LOG_MAGIC, words[:, 1], words[:, 0])
    if (cyc != c_rec).any():
        raise dirty(f"cycle numbers before the head (block {head % n}) are not uniform")
    headers = np.flatnonzero(words[:, 0] == LOG_MAGIC)
    if not len(headers):
        raise dirty("no log record header before the head")
    rec = int(headers[-1])
    rec_blk = w0 + rec
    h = before[rec * BB : (rec + 1) * BB]
    _magic, h_cycle, h_version, h_len, h_lsn, h_tail, _crc, h_prev, h_ops = struct.unpack_from(">IIIIQQIII", h)
    (h_size,) = struct.unpack_from(">I", h, 320)
    hblks = -(-h_size // 32768) if h_version == 2 and h_size > 32768 else 1
    if h_version not in (1, 2) or h_cycle != c_rec or h_lsn != (c_rec << 32 | rec_blk):
        raise dirty(f"log record header at block {rec_blk} is inconsistent")
    if h[304:320] != g.log_uuid:
        raise dirty("the last log record belongs to another filesystem (uuid)")
    if rec_blk + hblks + -(-h_len // BB) != head:
        raise dirty(f"the last log record (block {rec_blk}) does not end at the head (block {head % n})")
    prev_lsn = ((c_rec if h_prev < rec_blk else c_rec - 1) << 32) | h_prev
    if h_tail not in (h_lsn, prev_lsn):
        raise dirty(f"the last record's tail ({h_tail >> 32}/{h_tail & 0xFFFFFFFF}) lies further back")
    if h_ops != 1 or rec_blk + hblks >= head:
        raise dirty(f"the last log record (block {rec_blk}) is not an unmount record")
    op = before[(rec + hblks) * BB : (rec + hblks + 1) * BB]
    _len, clientid, flags = struct.unpack_from(">IBB", op, 4)
    um_magic = op[12:14]
    if clientid != XFS_LOG_CLIENT or not flags & XLOG_UNMOUNT_TRANS or um_magic not in (b"\x6e\x55", b"\x55\x6e"):
        raise dirty(f"the last log record (block {rec_blk}) is not an unmount record")
