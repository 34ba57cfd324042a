"""Partition tables (MBR and GPT) of a whole-disk source: where each partition lies, so that each can
be read through its own filesystem's used-block map while the table, boot code and gaps are stored raw.

Telling a table from a bare filesystem matters for correctness, not only speed: a FAT or NTFS boot
sector also ends in 0x55AA, so an MBR only counts when its entries are sane and sector 0 is not such a
boot sector. Once something is clearly a table, anything inconsistent in it raises `TableError` and
the caller reads every block: guessing at a broken layout could mark used data as unused.

All offsets and sizes here are bytes; `metadata_areas` are (offset, length) pairs.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import fsprobe

MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_GPT_PROTECTIVE = 0xEE
_GPT_SIGNATURE = b"EFI PART"
_SECTOR_SIZES = (512, 4096)
_MAX_LOGICALS = 256  # a longer EBR chain is a loop or garbage
_MAX_GPT_ARRAY = 1 << 22  # 4 MiB: far above any real entry array (16 KiB usual)

# UEFI GPT header: Signature, Revision, HeaderSize, HeaderCRC32, Reserved, MyLBA, AlternateLBA,
# FirstUsableLBA, LastUsableLBA, DiskGUID, PartitionEntryLBA, NumberOfPartitionEntries,
# SizeOfPartitionEntry, PartitionEntryArrayCRC32
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# GPT entry: PartitionTypeGUID, UniquePartitionGUID, StartingLBA, EndingLBA (inclusive), Attributes, name
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
# MBR / EBR entry: boot indicator, CHS start, type, CHS end, first LBA, sector count
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MBR_ENTRIES_AT = 446


class TableError(ValueError):
    """The volume clearly holds a partition table, but a broken one: read every block instead."""


@dataclass(frozen=True)
class Partition:
    number: int  # as Linux numbers it: GPT entry index + 1; MBR 1-4 primary, 5+ logical
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT type GUID, or MBR type as "0x83"
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT unique partition GUID

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def container(self) -> bool:
        """An MBR extended partition: it holds EBRs and logical partitions, not a filesystem."""
        return self.type in {f"0x{t:02x}" for t in MBR_EXTENDED}


@dataclass
class Table:
    kind: str  # "gpt" or "mbr"
    disk_id: str  # GPT disk GUID, or the MBR disk signature as 8 hex digits
    sector_size: int
    partitions: list[Partition]
    metadata_areas: list[tuple[int, int]]  # (offset, length) of the table's own sectors
    notes: list[str] = field(default_factory=list)  # what was repaired or looked odd

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise KeyError(f"no partition {number}")


Reader = Callable[[int, int], bytes]


def _guid(b: bytes) -> str:
    """GPT GUIDs store their first three fields little-endian."""
    a, b2, c = struct.unpack_from("<IHH", b)
    return f"{a:08x}-{b2:04x}-{c:04x}-{b[8:10].hex()}-{b[10:16].hex()}"


def _reader(read: Reader, size: int) -> Reader:
    def get(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > size:
            raise TableError(f"table structure outside the disk (bytes {offset}..{offset + length} of {size})")
        data = read(offset, length)
        if len(data) != length:
            raise TableError(f"short read at byte {offset}")
        return data

    return get


def _check_disjoint(ranges: Iterable[tuple[int, int, str]]) -> None:
    """Ranges (start, end, what) must not overlap: overlapping partitions mean a broken table."""
    ordered = sorted((r for r in ranges if r[1] > r[0]), key=lambda r: (r[0], r[1]))
    for (_, end, what), (start2, _, what2) in itertools.pairwise(ordered):
        if start2 < end:
            raise TableError(f"{what} overlaps {what2}")


def _meta_ranges(table: Table) -> list[tuple[int, int, str]]:
    return [(off, off + n, f"partition-table sector at byte {off}") for off, n in table.metadata_areas]


def read_table(read: Reader, size: int, *, sector_size: int | None = None) -> Table | None:
    """The partition table of a volume of `size` bytes, or None when the volume has none (a bare
    filesystem, or nothing recognisable). `sector_size` is the device's logical sector size when
    known; without it an MBR is taken as 512-byte sectors and a GPT is looked for at 512 and 4096."""
    if size < 512:
        return None
    get = _reader(read, size)
    s0 = get(0, 512)
    if s0[510:512] != b"\x55\xaa":
        return None  # neither an MBR nor a UEFI-conformant GPT (which needs a protective MBR)
    entries = [_MBR_ENTRY.unpack_from(s0, _MBR_ENTRIES_AT + 16 * i) for i in range(4)]
    p = fsprobe.probe(s0)
    fs_boot_sector = p is not None and p.kind in {"vfat", "ntfs", "exfat"}
    sizes = (sector_size,) if sector_size else _SECTOR_SIZES
    if any(e[2] == _GPT_PROTECTIVE and e[5] for e in entries):
        table = _read_gpt(get, size, sizes)
        if table is not None:
            return table
        if fs_boot_sector:
            return None
        raise TableError("protective MBR but no valid GPT header (primary or backup)")
    if fs_boot_sector:
        return None
    table = _read_mbr(get, size, s0, sector_size or 512)
    if table is not None and size >= 1024 and get(512, 8) == _GPT_SIGNATURE:
        table.notes.append("a GPT header without a protective MBR was ignored (stale GPT?)")
    return table


# ---------------------------------------------------------------- MBR


def _read_mbr(get: Reader, size: int, s0: bytes, ss: int) -> Table | None:
    entries = [_MBR_ENTRY.unpack_from(s0, _MBR_ENTRIES_AT + 16 * i) for i in range(4)]
    # Sanity that decides "is this a table at all": boot code or garbage rarely passes it.
    if any(boot not in (0x00, 0x80) for boot, *_ in entries):
        return None
    if any(typ == 0 and count for _, _, typ, _, _, count in entries):
        return None
    used = [(slot, typ, start, count) for slot, (_, _, typ, _, start, count) in enumerate(entries) if typ and count]
    if not used:
        return None
    disk_sectors = size // ss
    table = Table("mbr", s0[440:444][::-1].hex(), ss, [], [(0, ss)])
    primaries: list[tuple[int, int, str]] = [(0, ss, "the MBR")]
    for slot, typ, start, count in used:
        if start == 0:
            raise TableError(f"partition {slot + 1} starts at sector 0 (the MBR)")
        if start + count > disk_sectors:
            raise TableError(f"partition {slot + 1} ends past the end of the disk ({start + count} > {disk_sectors})")
        table.partitions.append(Partition(slot + 1, start * ss, count * ss, f"0x{typ:02x}"))
        primaries.append((start * ss, (start + count) * ss, f"partition {slot + 1}"))
    _check_disjoint(primaries)
    number = 5
    for slot, typ, start, count in used:
        if typ in MBR_EXTENDED:
            number = _read_logicals(get, table, start, count, number, f"partition {slot + 1}")
    inner = [(p.start, p.end, f"partition {p.number}") for p in table.partitions if not p.container]
    _check_disjoint(inner + _meta_ranges(table))
    return table


def _read_logicals(get: Reader, table: Table, ext_start: int, ext_count: int, number: int, what: str) -> int:
    """Follow the EBR chain of one extended partition; logical partitions are numbered on from `number`
    in chain order, as Linux does. Returns the next free number."""
    ss = table.sector_size
    ext_end = ext_start + ext_count
    ebr = ext_start
    seen: set[int] = set()
    while True:
        if ebr in seen or len(seen) >= _MAX_LOGICALS:
            raise TableError(f"the EBR chain of {what} loops")
        seen.add(ebr)
        if not ext_start <= ebr < ext_end:
            raise TableError(f"an EBR of {what} lies outside it (sector {ebr})")
        sec = get(ebr * ss, 512)
        table.metadata_areas.append((ebr * ss, ss))
        if sec[510:512] != b"\x55\xaa":
            if ebr == ext_start and not any(sec):
                return number  # an extended partition with no logical partitions yet
            raise TableError(f"EBR at sector {ebr} of {what} has no 0x55AA signature")
        link = None
        for i in range(4):
            boot, _, typ, _, start, count = _MBR_ENTRY.unpack_from(sec, _MBR_ENTRIES_AT + 16 * i)
            if not typ or not count:
                continue
            if typ in MBR_EXTENDED:
                if link is None:
                    link = start
                continue
            first = ebr + start
            if start == 0 or first + count > ext_end:
                raise TableError(f"logical partition {number} lies outside {what}")
            if boot not in (0x00, 0x80):
                raise TableError(f"logical partition {number} has a bad boot flag 0x{boot:02x}")
            table.partitions.append(Partition(number, first * ss, count * ss, f"0x{typ:02x}"))
            number += 1
        if link is None:
            return number
        ebr = ext_start + link  # links are relative to the start of the extended partition


# ---------------------------------------------------------------- GPT


@dataclass
class _Gpt:
    ss: int
    lba: int
    header: bytes  # the whole header sector
    alternate: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entry_lba: int
    entries: int
    entry_size: int
    array: bytes

    @property
    def array_sectors(self) -> int:
        return -(-len(self.array) // self.ss)


def _gpt_at(get: Reader, size: int, ss: int, lba: int) -> tuple[_Gpt | None, str]:
    """The GPT header at `lba` with its entry array, both CRC-checked; or None and why not."""
    if lba < 1 or (lba + 1) * ss > size:
        return None, "outside the disk"
    sec = get(lba * ss, ss)
    if sec[:8] != _GPT_SIGNATURE:
        return None, "no signature"
    (_, _, hsize, crc, _, my_lba, alternate, first_usable, last_usable, disk_guid, entry_lba, entries, entry_size,
     array_crc) = _GPT_HEADER.unpack_from(sec)  # fmt: skip
    if not _GPT_HEADER.size <= hsize <= ss:
        return None, f"bad header size {hsize}"
    if zlib.crc32(sec[:16] + b"\0\0\0\0" + sec[20:hsize]) != crc:
        return None, "bad header CRC"
    if my_lba != lba:
        return None, f"header says it is at LBA {my_lba}"
    if entry_size < _GPT_ENTRY.size or entry_size % _GPT_ENTRY.size or entries * entry_size > _MAX_GPT_ARRAY:
        return None, f"bad entry array shape ({entries} x {entry_size} bytes)"
    array_bytes = entries * entry_size
    if entry_lba < 1 or entry_lba * ss + array_bytes > size:
        return None, "entry array outside the disk"
    array = get(entry_lba * ss, array_bytes)
    if zlib.crc32(array) != array_crc:
        return None, "bad entry array CRC"
    g = _Gpt(ss, lba, sec, alternate, first_usable, last_usable, disk_guid, entry_lba, entries, entry_size, array)
    return g, ""


def _read_gpt(get: Reader, size: int, sizes: tuple[int, ...]) -> Table | None:
    notes: list[str] = []
    gpt = None
    damage = ""
    for ss in sizes:
        gpt, why = _gpt_at(get, size, ss, 1)
        if gpt is not None:
            break
        if why != "no signature" and not damage:
            damage = f"primary GPT header damaged ({why})"
    if gpt is None:
        for ss in sizes:
            last = size // ss - 1
            gpt, _ = _gpt_at(get, size, ss, last)
            if gpt is not None:
                notes.append(f"{damage or 'primary GPT header missing'}: read the backup header at LBA {last}")
                break
    if gpt is None:
        return None
    ss = gpt.ss
    disk_sectors = size // ss
    meta = [(0, ss)]
    if gpt.lba == 1:
        meta += [(ss, ss), (gpt.entry_lba * ss, gpt.array_sectors * ss)]
        backup, why = _gpt_at(get, size, ss, gpt.alternate)
        if backup is None:
            notes.append(f"backup GPT header at LBA {gpt.alternate} unusable ({why})")
            if gpt.alternate < disk_sectors:
                meta.append((gpt.alternate * ss, ss))
        else:
            meta += [(backup.entry_lba * ss, backup.array_sectors * ss), (backup.lba * ss, ss)]
            if backup.array != gpt.array or backup.disk_guid != gpt.disk_guid:
                notes.append("primary and backup GPT differ; used the primary")
        if gpt.alternate != disk_sectors - 1:
            notes.append(f"backup GPT header is at LBA {gpt.alternate}, not at the last LBA {disk_sectors - 1}")
    else:
        # The backup does not say where the primary array lives: assume the usual LBA 2.
        meta += [(ss, ss), (2 * ss, max(0, min(gpt.array_sectors, gpt.first_usable - 2)) * ss)]
        meta += [(gpt.entry_lba * ss, gpt.array_sectors * ss), (gpt.lba * ss, ss)]
    if gpt.first_usable > gpt.last_usable + 1:
        raise TableError(f"GPT usable range {gpt.first_usable}..{gpt.last_usable} is empty")
    if gpt.last_usable >= disk_sectors:
        notes.append(f"GPT usable range ends at LBA {gpt.last_usable}, past the disk's {disk_sectors} sectors")
    table = Table("gpt", _guid(gpt.disk_guid), ss, [], meta, notes)
    for i in range(gpt.entries):
        type_guid, uniq, first, last, _, raw_name = _GPT_ENTRY.unpack_from(gpt.array, i * gpt.entry_size)
        if not any(type_guid):
            continue
        if not gpt.first_usable <= first <= last <= gpt.last_usable:
            raise TableError(f"GPT partition {i + 1} (LBA {first}..{last}) lies outside the usable range "
                             f"{gpt.first_usable}..{gpt.last_usable}")  # fmt: skip
        if last >= disk_sectors:
            raise TableError(f"GPT partition {i + 1} ends past the end of the disk (LBA {last} of {disk_sectors})")
        name = raw_name.decode("utf-16-le", "replace").split("\0", 1)[0]
        start, length = first * ss, (last - first + 1) * ss
        table.partitions.append(Partition(i + 1, start, length, _guid(type_guid), name, _guid(uniq)))
    _check_disjoint([(p.start, p.end, f"partition {p.number}") for p in table.partitions] + _meta_ranges(table))
    return table


# ---------------------------------------------------------------- JSON


def to_json(table: Table) -> dict[str, Any]:
    return {
        "kind": table.kind,
        "disk_id": table.disk_id,
        "sector_size": table.sector_size,
        "partitions": [
            {"number": p.number, "start": p.start, "size": p.size, "type": p.type, "name": p.name, "uuid": p.uuid}
            for p in table.partitions
        ],
        "metadata_areas": [[off, n] for off, n in table.metadata_areas],
        "notes": list(table.notes),
    }


def from_json(d: dict[str, Any]) -> Table:
    """The inverse of `to_json`; ValueError when the stored layout is malformed."""
    try:
        parts = [
            Partition(int(p["number"]), int(p["start"]), int(p["size"]), str(p["type"]), str(p["name"]), str(p["uuid"]))
            for p in d["partitions"]
        ]
        meta = [(int(off), int(n)) for off, n in d.get("metadata_areas", [])]
        notes = [str(n) for n in d.get("notes", [])]
        table = Table(str(d["kind"]), str(d["disk_id"]), int(d["sector_size"]), parts, meta, notes)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed partition layout: {e!r}") from e
    if table.kind not in ("gpt", "mbr"):
        raise ValueError(f"malformed partition layout: unknown kind {table.kind!r}")
    return table


# ---------------------------------------------------------------- restore onto a larger disk


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"short read at byte {offset}")
    return data


def _pwrite(fd: int, offset: int, data: bytes) -> None:
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(f"short write at byte {offset}")


def _with_crc(header: bytearray, hsize: int) -> bytes:
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:hsize])))
    return bytes(header)


def relocate_gpt_backup(fd: int, old_size: int, new_size: int, sector_size: int) -> bool:
    """After restoring a whole-disk image of `old_size` bytes onto a larger device, move the GPT backup
    (entry array and header) to the new end and widen the usable range, as `sgdisk -e` does: without
    it the disk's firmware and tools see a misplaced or missing backup. False when nothing was written:
    no GPT, no growth, or the backup already at the end. TableError when the primary GPT is damaged."""
    ss = sector_size
    if new_size < old_size:
        raise ValueError(f"the target ({new_size} bytes) is smaller than the image ({old_size} bytes)")
    if new_size // ss == old_size // ss:
        return False  # same size: the restore stays an exact copy of the source

    def get(offset: int, length: int) -> bytes:
        return _pread(fd, offset, length)

    s0 = get(0, 512)
    if s0[510:512] != b"\x55\xaa" or get(ss, 8) != _GPT_SIGNATURE:
        return False
    gpt, why = _gpt_at(get, new_size, ss, 1)
    if gpt is None:
        raise TableError(f"cannot relocate the GPT backup: primary GPT header unusable ({why})")
    new_last = new_size // ss - 1
    if gpt.alternate == new_last:
        return False
    hsize = struct.unpack_from("<I", gpt.header, 12)[0]
    array_lba = new_last - gpt.array_sectors
    last_usable = array_lba - 1
    if gpt.alternate > new_last or last_usable < gpt.last_usable:
        raise TableError(f"the GPT backup at LBA {gpt.alternate} does not fit below LBA {new_last}")
    old_alternate = gpt.alternate

    # The new backup first: until the primary points at it, the old layout stays consistent.
    array = gpt.array + b"\0" * (gpt.array_sectors * ss - len(gpt.array))
    _pwrite(fd, array_lba * ss, array)
    backup = bytearray(ss)
    backup[:hsize] = gpt.header[:hsize]
    struct.pack_into("<QQQQ", backup, 24, new_last, 1, gpt.first_usable, last_usable)
    struct.pack_into("<Q", backup, 72, array_lba)
    _pwrite(fd, new_last * ss, _with_crc(backup, hsize))

    primary = bytearray(gpt.header)
    struct.pack_into("<QQ", primary, 32, new_last, gpt.first_usable)
    struct.pack_into("<Q", primary, 48, last_usable)
    _pwrite(fd, ss, _with_crc(primary, hsize))

    # The old backup header now lies inside the disk: zero it so nothing finds a stale header there
    # (only if it is one, and not where the new array was just written).
    if 1 < old_alternate < array_lba and get(old_alternate * ss, 8) == _GPT_SIGNATURE:
        _pwrite(fd, old_alternate * ss, b"\0" * ss)

    # The protective entry should cover the whole disk; a hybrid MBR's partial 0xEE entry stays as it is.
    mbr = bytearray(s0)
    old_last = old_size // ss - 1
    for i in range(4):
        off = _MBR_ENTRIES_AT + 16 * i
        _, _, typ, _, start, count = _MBR_ENTRY.unpack_from(mbr, off)
        if typ == _GPT_PROTECTIVE and start == 1 and count >= min(old_last, 0xFFFFFFFF):
            struct.pack_into("<I", mbr, off + 12, min(new_last, 0xFFFFFFFF))
    if mbr != s0:
        _pwrite(fd, 0, bytes(mbr))
    return True
