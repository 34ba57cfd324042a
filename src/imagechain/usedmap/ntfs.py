"""NTFS: which clusters the volume uses, from its boot sector, the MFT records of $MFT (0), $MFTMirr (1),
$LogFile (2), $Volume (3) and $Bitmap (6), and the cluster bitmap held in $Bitmap's unnamed $DATA.

A set bit in $Bitmap is a cluster in use. Marked used besides: the boot area (first 8 KiB and cluster 0),
the runs of $MFT, $MFTMirr, $LogFile and $Bitmap (all in the bitmap too, marked again in case it is
wrong about them), and every byte past the last whole cluster up to the end of the area (the backup
boot sector sits in the sector numbered total_sectors, after the clusters). Bitmap bytes past the
attribute's initialised size count as in use.

Every MFT record read gets its multi-sector fixups applied and checked. Unusable when: the boot sector is
not NTFS (OEM id, 0x55AA, zero legacy BPB fields, bytes per sector not a power of two in 256..4096,
cluster size above 2 MiB, bad MFT or index record size encoding, $MFT/$MFTMirr cluster outside the
volume); the volume (with its backup boot sector) is larger than the area; an MFT record's signature is
not FILE (BAAD included), its update sequence array or header is inconsistent (sizes, offsets, its own
record number), it is not in use, or a fixup does not match; an attribute or runlist runs past its record
or attribute, or a run is empty or lies outside the volume; the VCNs a runlist covers disagree with its
header, or an attribute's sizes disagree with each other or its runs; $MFT's $DATA does not start at the
boot sector's MFT cluster; the $DATA of $MFT, $MFTMirr, $LogFile or $Bitmap is missing, duplicated,
compressed or encrypted, or (but for $Bitmap) resident; $MFT or $Bitmap has a sparse run; $Bitmap has an
$ATTRIBUTE_LIST (its runlist could be split over extent records); the bitmap has fewer bits than the
volume has clusters; $Volume's $VOLUME_INFORMATION is missing, has an unknown
major version, or carries the dirty (0x0001) or chkdsk-underway (0x4000) flag; $LogFile is neither
empty (all 0xFF, as ntfs-3g and mkntfs leave it) nor has a valid restart page, or its newest restart
area has a log client in use without the clean-shutdown flag (Windows did not dismount it cleanly: the
log needs replaying and the bitmap may be stale).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import Area, Unusable

_BLOCK = 512  # multi-sector transfer stride: fixed, whatever the sector size
_CHUNK = 2 << 20  # bitmap bytes read and decoded at a time (16 Mi clusters)
_BATCH = 1 << 22  # cluster runs gathered before they are marked
_END = 0xFFFFFFFF
_ATTR_LIST, _VOLUME_INFO, _DATA = 0x20, 0x70, 0x80
_DIRTY, _CHKDSK_UNDERWAY = 0x0001, 0x4000
_LOG_NO_CLIENT, _LOG_CLEAN = 0xFFFF, 0x0002


@dataclass(frozen=True)
class Geometry:
    sector: int  # bytes
    cluster: int  # bytes
    clusters: int  # clusters in the volume
    total_sectors: int  # from the boot sector; the backup boot sector is this sector
    mft_record: int  # bytes


@dataclass(frozen=True)
class _Attr:
    type: int
    name_length: int
    flags: int
    resident: bool
    body: bytes  # the whole attribute record


@dataclass(frozen=True)
class _Runs:
    vcn: np.ndarray  # first VCN of each run
    lcn: np.ndarray  # -1: sparse
    length: np.ndarray  # clusters


@dataclass(frozen=True)
class _Layout:
    geo: Geometry
    meta: list[_Runs]  # runs of $MFT, $MFTMirr, $LogFile, $Bitmap
    bitmap: bytes | None  # a resident bitmap's bytes, else None
    bitmap_runs: _Runs
    bitmap_readable: int  # bitmap bytes that can be read (initialised and needed)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _geometry(area: Area) -> Geometry:
    b = area.read(0, 512)
    if b[3:11] != b"NTFS    ":
        raise Unusable("not an NTFS boot sector (OEM id is not 'NTFS    ')")
    if b[510:512] != b"\x55\xaa":
        raise Unusable("ntfs boot sector lacks its 0x55AA signature")
    bps, spc_raw, reserved, fats, root_entries, sectors16 = struct.unpack_from("<HBHBHH", b, 11)
    (sectors_per_fat,) = struct.unpack_from("<H", b, 0x16)
    (sectors32,) = struct.unpack_from("<I", b, 0x20)
    total, mft_lcn, mirr_lcn = struct.unpack_from("<qqq", b, 0x28)
    mft_raw, index_raw = struct.unpack_from("<b3xb", b, 0x40)
    if not _power_of_two(bps) or not 256 <= bps <= 4096:
        raise Unusable(f"ntfs bytes per sector {bps} is not a power of two in 256..4096")
    if reserved or fats or root_entries or sectors16 or sectors_per_fat or sectors32:
        raise Unusable("ntfs boot sector has non-zero FAT fields")
    if spc_raw > 0x80:
        spc = 1 << (256 - spc_raw)
    elif _power_of_two(spc_raw):
        spc = spc_raw
    else:
        raise Unusable(f"ntfs sectors per cluster byte {spc_raw:#x} is invalid")
    cluster = bps * spc
    if cluster > 2 << 20:
        raise Unusable(f"ntfs cluster size {cluster} is above 2 MiB")

    def record_size(raw: int, what: str) -> int:
        size = raw * cluster if raw > 0 else (1 << -raw if -31 <= raw < 0 else 0)
        if not _power_of_two(size) or not 256 <= size <= 2 << 20:
            raise Unusable(f"ntfs {what} record size encoding {raw} is invalid")
        return size

    mft_record = record_size(mft_raw, "MFT")
    record_size(index_raw, "index")
    if mft_record < _BLOCK:
        raise Unusable(f"ntfs MFT record size {mft_record} is below 512")
    clusters = total // spc if total > 0 else 0
    if clusters <= 0:
        raise Unusable(f"ntfs total sectors {total} is invalid")
    if (total + 1) * bps > area.size:
        raise Unusable(f"ntfs volume ({(total + 1) * bps} bytes with its backup boot sector) is larger than "
                       f"the area ({area.size} bytes)")  # fmt: skip
    for name, lcn in (("$MFT", mft_lcn), ("$MFTMirr", mirr_lcn)):
        if not 0 <= lcn < clusters:
            raise Unusable(f"ntfs {name} cluster {lcn} is outside the volume ({clusters} clusters)")
    return Geometry(bps, cluster, clusters, total, mft_record)


def _fixup(rec: bytearray, what: str) -> None:
    """Undo the multi-sector protection in place: the last two bytes of every 512-byte stride hold the
    update sequence number, and the real bytes are in the update sequence array; a stride whose bytes
    differ was torn or corrupted."""
    usa_ofs, usa_count = struct.unpack_from("<HH", rec, 4)
    if usa_count != len(rec) // _BLOCK + 1 or usa_ofs & 1 or usa_ofs < 8 or usa_ofs + 2 * usa_count > _BLOCK - 2:
        raise Unusable(f"ntfs {what} has a bad update sequence array (offset {usa_ofs}, count {usa_count})")
    usn = rec[usa_ofs : usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * _BLOCK
        if rec[end - 2 : end] != usn:
            raise Unusable(f"ntfs {what}: multi-sector fixup mismatch in sector {i - 1}")
        rec[end - 2 : end] = rec[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]


def _read_stream(area: Area, geo: Geometry, runs: _Runs, offset: int, length: int, what: str) -> bytes:
    """Bytes [offset, offset + length) of a non-resident attribute, through its runs."""
    cs = geo.cluster
    out = []
    pos, end = offset, offset + length
    while pos < end:
        vcn = pos // cs
        i = int(np.searchsorted(runs.vcn, vcn, side="right")) - 1
        if i < 0 or vcn >= runs.vcn[i] + runs.length[i]:
            raise Unusable(f"ntfs {what}: byte {pos} is past its runlist")
        if runs.lcn[i] < 0:
            raise Unusable(f"ntfs {what}: byte {pos} lies in a sparse run")
        run_end = int(runs.vcn[i] + runs.length[i]) * cs
        n = min(end, run_end) - pos
        out.append(area.read(int(runs.lcn[i]) * cs + pos - int(runs.vcn[i]) * cs, n))
        pos += n
    return b"".join(out)


def _attributes(rec: bytes, what: str) -> Iterator[_Attr]:
    (attrs_ofs,) = struct.unpack_from("<H", rec, 0x14)
    (in_use,) = struct.unpack_from("<I", rec, 0x18)
    pos = attrs_ofs
    while True:
        if pos + 4 > in_use:
            raise Unusable(f"ntfs {what}: attributes run past the record's used size")
        (atype,) = struct.unpack_from("<I", rec, pos)
        if atype == _END:
            return
        if pos + 16 > in_use:
            raise Unusable(f"ntfs {what}: attribute header runs past the record")
        length, non_resident, name_length, _name_ofs, flags = struct.unpack_from("<IBBHH", rec, pos + 4)
        if length < 24 or length & 7 or pos + length > in_use or non_resident > 1 or (non_resident and length < 64):
            raise Unusable(f"ntfs {what}: attribute {atype:#x} has a bad length {length}")
        yield _Attr(atype, name_length, flags, not non_resident, bytes(rec[pos : pos + length]))
        pos += length


def _resident_value(a: _Attr, what: str) -> bytes:
    vlen, vofs = struct.unpack_from("<IH", a.body, 0x10)
    if vofs + vlen > len(a.body):
        raise Unusable(f"ntfs {what}: resident value runs past its attribute")
    return a.body[vofs : vofs + vlen]


def _runlist(a: _Attr, geo: Geometry, what: str) -> _Runs:
    """Decode mapping pairs: a header byte (low nibble: bytes of length, high nibble: bytes of the signed
    LCN delta, 0 = sparse), then those fields, until a zero byte."""
    lowest, highest, mp_ofs = struct.unpack_from("<qqH", a.body, 0x10)
    body = a.body
    vcns: list[int] = []
    lcns: list[int] = []
    lens: list[int] = []
    vcn, lcn, pos = lowest, 0, mp_ofs
    while True:
        if pos >= len(body):
            raise Unusable(f"ntfs {what}: runlist runs past its attribute")
        h = body[pos]
        if h == 0:
            break
        ln, on = h & 0xF, h >> 4
        if not 1 <= ln <= 8 or on > 8 or pos + 1 + ln + on > len(body):
            raise Unusable(f"ntfs {what}: runlist runs past its attribute")
        count = int.from_bytes(body[pos + 1 : pos + 1 + ln], "little", signed=True)
        if count <= 0:
            raise Unusable(f"ntfs {what}: runlist has an empty run")
        if on:
            lcn += int.from_bytes(body[pos + 1 + ln : pos + 1 + ln + on], "little", signed=True)
            if lcn < 0 or lcn + count > geo.clusters:
                raise Unusable(f"ntfs {what}: run {lcn}+{count} lies outside the volume ({geo.clusters} clusters)")
            lcns.append(lcn)
        else:
            lcns.append(-1)
        vcns.append(vcn)
        lens.append(count)
        vcn += count
        pos += 1 + ln + on
    if lowest < 0 or vcn != highest + 1:
        raise Unusable(f"ntfs {what}: runlist covers VCNs {lowest}..{vcn - 1}, its header says ..{highest}")
    return _Runs(np.array(vcns, np.int64), np.array(lcns, np.int64), np.array(lens, np.int64))


class _Mft:
    """MFT records by number, read through $MFT's own runs (bootstrapped from the boot sector)."""

    def __init__(self, area: Area, geo: Geometry, mft_lcn: int) -> None:
        self.area, self.geo = area, geo
        n = -(-geo.mft_record // geo.cluster)
        self.runs = _Runs(np.array([0], np.int64), np.array([mft_lcn], np.int64), np.array([n], np.int64))
        rec0 = self.record(0, "$MFT")
        data = _unnamed_data(rec0, "$MFT")
        if not data.resident:
            self.runs = _runlist(data, geo, "$MFT")
        if data.resident or self.runs.vcn[0] != 0 or int(self.runs.lcn[0]) != mft_lcn:
            raise Unusable("ntfs $MFT's $DATA does not start at the boot sector's MFT cluster")
        if (self.runs.lcn < 0).any():
            raise Unusable("ntfs $MFT has a sparse run")

    def record(self, number: int, what: str) -> bytes:
        rs = self.geo.mft_record
        rec = bytearray(_read_stream(self.area, self.geo, self.runs, number * rs, rs, what))
        if rec[:4] != b"FILE":
            raise Unusable(f"ntfs MFT record {number} ({what}) has signature {bytes(rec[:4])!r}, not FILE")
        _fixup(rec, f"MFT record {number} ({what})")
        usa_ofs, usa_count = struct.unpack_from("<HH", rec, 4)
        attrs_ofs, flags, in_use, allocated, base = struct.unpack_from("<HHIIQ", rec, 0x14)
        if not flags & 1:
            raise Unusable(f"ntfs MFT record {number} ({what}) is not in use")
        if allocated != rs or not usa_ofs + 2 * usa_count <= attrs_ofs < in_use <= rs or attrs_ofs & 7 or base:
            raise Unusable(f"ntfs MFT record {number} ({what}) has an inconsistent header")
        (own,) = struct.unpack_from("<I", rec, 0x2C)
        if usa_ofs >= 0x30 and own != number:
            raise Unusable(f"ntfs MFT record {number} ({what}) says it is record {own}")
        return bytes(rec)


def _unnamed_data(rec: bytes, what: str) -> _Attr:
    found = [a for a in _attributes(rec, what) if a.type == _DATA and a.name_length == 0]
    if len(found) != 1:
        raise Unusable(f"ntfs {what} has {len(found)} unnamed $DATA attributes in its base record, not 1")
    a = found[0]
    if a.flags & 0x40FF:  # compressed or encrypted
        raise Unusable(f"ntfs {what}'s $DATA is compressed or encrypted")
    if a.resident:
        return a
    if struct.unpack_from("<q", a.body, 0x10)[0] != 0:
        raise Unusable(f"ntfs {what}'s $DATA in its base record does not start at VCN 0")
    return a


def _sizes(a: _Attr, geo: Geometry, what: str) -> tuple[int, int, int]:
    """(allocated, data, initialised) sizes of a non-resident attribute, checked against its runlist."""
    highest = struct.unpack_from("<q", a.body, 0x18)[0]
    alloc, size, init = struct.unpack_from("<qqq", a.body, 0x28)
    if not 0 <= init <= size <= alloc or alloc > (highest + 1) * geo.cluster:
        raise Unusable(f"ntfs {what}: sizes (allocated {alloc}, data {size}, initialised {init}) disagree")
    return alloc, size, init


def _check_volume(rec: bytes) -> None:
    infos = [a for a in _attributes(rec, "$Volume") if a.type == _VOLUME_INFO]
    if len(infos) != 1 or infos[0].resident is False:
        raise Unusable("ntfs $Volume has no resident $VOLUME_INFORMATION")
    value = _resident_value(infos[0], "$Volume")
    if len(value) < 12:
        raise Unusable("ntfs $VOLUME_INFORMATION is too short")
    major, _minor, flags = struct.unpack_from("<BBH", value, 8)
    if major not in (1, 3):
        raise Unusable(f"ntfs version {major}.{_minor} is unknown")
    if flags & _DIRTY:
        raise Unusable("ntfs volume is marked dirty")
    if flags & _CHKDSK_UNDERWAY:
        raise Unusable("ntfs volume is marked as being checked (chkdsk underway)")


def _check_logfile(area: Area, geo: Geometry, runs: _Runs, readable: int) -> None:
    """The restart pages (at 0 and at the system page size) say whether the log has to be replayed: a
    log client in use and no clean-shutdown flag in the newest restart area. A log that was reset by
    ntfs-3g or made by mkntfs is all 0xFF: nothing to replay."""
    head = _read_stream(area, geo, runs, 0, min(readable, 128 << 10), "$LogFile")
    best: tuple[int, int, int] | None = None  # (current LSN, client in use list, flags)
    pos = 0
    while pos + _BLOCK <= len(head):
        if head[pos : pos + 4] in (b"RSTR", b"CHKD"):
            page_size, log_page, ra_ofs = struct.unpack_from("<IIH", head, pos + 0x10)
            if (_power_of_two(page_size) and _BLOCK <= page_size <= 65536 and _power_of_two(log_page)
                    and pos in (0, page_size) and pos + page_size <= len(head)):  # fmt: skip
                page = bytearray(head[pos : pos + page_size])
                try:
                    _fixup(page, "$LogFile restart page")
                except Unusable:
                    page = bytearray()
                if page and not ra_ofs & 7 and ra_ofs + 0x30 <= page_size:
                    lsn, _clients, _free, in_use, flags = struct.unpack_from("<QHHHH", page, ra_ofs)
                    if best is None or lsn > best[0]:
                        best = (lsn, in_use, flags)
        pos = pos * 2 if pos else _BLOCK
    if best is None:
        if head.count(0xFF) == len(head):
            return
        raise Unusable("ntfs $LogFile has no valid restart page")
    if best[1] != _LOG_NO_CLIENT and not best[2] & _LOG_CLEAN:
        raise Unusable("ntfs $LogFile is not clean: the volume was not cleanly unmounted (log needs replaying)")


def _layout(area: Area) -> _Layout:
    geo = _geometry(area)
    mft_lcn = struct.unpack_from("<q", area.read(0x30, 8))[0]
    mft = _Mft(area, geo, mft_lcn)
    meta = [mft.runs]
    for number, name in ((1, "$MFTMirr"), (2, "$LogFile")):
        data = _unnamed_data(mft.record(number, name), name)
        if data.resident:
            raise Unusable(f"ntfs {name}'s $DATA is resident")
        meta.append(_runlist(data, geo, name))
        if number == 2:
            _check_logfile(area, geo, meta[-1], _sizes(data, geo, name)[2])
    _check_volume(mft.record(3, "$Volume"))
    rec = mft.record(6, "$Bitmap")
    if any(a.type == _ATTR_LIST for a in _attributes(rec, "$Bitmap")):
        raise Unusable("ntfs $Bitmap has an $ATTRIBUTE_LIST (extent records are not supported)")
    data = _unnamed_data(rec, "$Bitmap")
    need = -(-geo.clusters // 8)
    if data.resident:
        value = _resident_value(data, "$Bitmap")
        if len(value) < need:
            raise Unusable(f"ntfs bitmap has {len(value) * 8} bits for {geo.clusters} clusters")
        empty = _Runs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return _Layout(geo, meta, value[:need], empty, need)
    runs = _runlist(data, geo, "$Bitmap")
    if (runs.lcn < 0).any():
        raise Unusable("ntfs $Bitmap has a sparse run")
    _, size, init = _sizes(data, geo, "$Bitmap")  # bytes past `init` read as in use
    if size < need:
        raise Unusable(f"ntfs bitmap has {size * 8} bits for {geo.clusters} clusters")
    meta.append(runs)
    return _Layout(geo, meta, None, runs, min(init, need))


def _bitmap_chunks(area: Area, lay: _Layout) -> Iterator[tuple[int, np.ndarray]]:
    """(first cluster, in-use bits) pieces of the cluster bitmap, so a large volume's bitmap is never
    held decoded all at once; bits past the initialised size count as in use."""
    clusters = lay.geo.clusters
    need = -(-clusters // 8)
    for start in range(0, need, _CHUNK):
        n = min(_CHUNK, need - start)
        if lay.bitmap is not None:
            raw = lay.bitmap[start : start + n]
        else:
            k = max(0, min(n, lay.bitmap_readable - start))
            raw = _read_stream(area, lay.geo, lay.bitmap_runs, start, k, "$Bitmap") + b"\xff" * (n - k)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").view(bool)
        yield start * 8, bits[: clusters - start * 8]


def _marked(lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(first cluster, count) of the metadata runs and the boot area, marked whatever the bitmap says."""
    lcn = np.concatenate([np.zeros(0, np.int64), *(r.lcn for r in lay.meta)])
    length = np.concatenate([np.zeros(0, np.int64), *(r.length for r in lay.meta)])
    keep = lcn >= 0
    boot = -(-8192 // lay.geo.cluster)
    return np.concatenate(([0], lcn[keep])), np.concatenate(([min(boot, lay.geo.clusters)], length[keep]))


def cluster_map(area: Area) -> tuple[Geometry, np.ndarray]:
    """Per cluster of the volume: in use (the bitmap, plus the metadata runs and boot area kept anyway)."""
    lay = _layout(area)
    out = np.zeros(lay.geo.clusters, bool)
    for first, bits in _bitmap_chunks(area, lay):
        out[first : first + len(bits)] = bits
    for s, n in zip(*_marked(lay), strict=True):
        out[s : s + n] = True
    return lay.geo, out


def _runs_of(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index, count) of each run of True in `bits`, without temporaries wider than a bool."""
    if len(bits) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bounds = np.concatenate(([0], np.flatnonzero(bits[1:] != bits[:-1]) + 1, [len(bits)])).astype(np.int64)
    on = bits[bounds[:-1]]
    return bounds[:-1][on], np.diff(bounds)[on]


def parse(area: Area) -> str:
    lay = _layout(area)
    geo = lay.geo
    count = 0
    # every marking call costs a pass over the whole used map: gather the runs and mark them at once
    # (in batches, should the bitmap be very fragmented)
    lcn, length = _marked(lay)
    firsts, counts, pending = [lcn], [length], len(lcn)
    for first, bits in _bitmap_chunks(area, lay):
        count += int(np.count_nonzero(bits))
        starts, n = _runs_of(bits)
        firsts.append(starts + first)
        counts.append(n)
        pending += len(starts)
        if pending > _BATCH:
            area.used_runs(np.concatenate(firsts) * geo.cluster, np.concatenate(counts) * geo.cluster)
            firsts, counts, pending = [], [], 0
    tail = geo.clusters * geo.cluster
    offsets = np.concatenate([np.concatenate(firsts or [np.zeros(0, np.int64)]) * geo.cluster, [0, tail]])
    lengths = np.concatenate([np.concatenate(counts or [np.zeros(0, np.int64)]) * geo.cluster,
                              [min(8192, area.size), area.size - tail]])  # fmt: skip
    area.used_runs(offsets, lengths)
    size = f"{geo.cluster >> 10} KiB" if geo.cluster >= 1024 else f"{geo.cluster} B"
    return f"ntfs, {size} clusters, {count} of {geo.clusters} in use"
