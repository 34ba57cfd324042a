"""Recognise what a volume holds from its first 68 KiB: gives sources a stable identity
(filesystem or partition-table UUID) and tells which filesystem a repository lives on."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PROBE_BYTES = 0x10000 + 4096  # btrfs keeps its superblock at 64 KiB


@dataclass(frozen=True)
class Probe:
    kind: str  # ext4, xfs, btrfs, ntfs, exfat, vfat, gpt, mbr
    uuid: str  # as the OS shows it (blkid style)
    label: str = ""


def _hexuuid(b: bytes) -> str:
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _guid(b: bytes) -> str:  # mixed-endian GUID as in GPT
    a, b2, c = struct.unpack_from("<IHH", b)
    return f"{a:08x}-{b2:04x}-{c:04x}-{b[8:10].hex()}-{b[10:16].hex()}"


def probe(head: bytes) -> Probe | None:
    """Identify the volume from its first PROBE_BYTES bytes (fewer is fine for small volumes)."""

    def at(off: int, n: int) -> bytes:
        return head[off : off + n] if len(head) >= off + n else b""

    if at(1024 + 56, 2) == b"\x53\xef":
        uuid = at(1024 + 104, 16)
        label = at(1024 + 120, 16).split(b"\0")[0].decode("utf-8", "replace")
        if any(uuid):
            return Probe("ext4", _hexuuid(uuid), label)
    if at(0, 4) == b"XFSB":
        return Probe("xfs", _hexuuid(at(32, 16)), at(108, 12).split(b"\0")[0].decode("utf-8", "replace"))
    if at(0x10040, 8) == b"_BHRfS_M":
        return Probe("btrfs", _hexuuid(at(0x10020, 16)))
    if at(512, 8) == b"EFI PART":
        return Probe("gpt", _guid(at(512 + 56, 16)))
    if at(3, 8) == b"NTFS    ":
        return Probe("ntfs", at(0x48, 8)[::-1].hex().upper())
    if at(3, 8) == b"EXFAT   ":
        return Probe("exfat", _serial(at(100, 4)))
    if at(82, 5) == b"FAT32":
        return Probe("vfat", _serial(at(67, 4)), at(71, 11).decode("ascii", "replace").strip())
    if at(54, 4) == b"FAT1":
        return Probe("vfat", _serial(at(39, 4)), at(43, 11).decode("ascii", "replace").strip())
    if at(510, 2) == b"\x55\xaa" and any(at(440, 4)):
        return Probe("mbr", at(440, 4)[::-1].hex())
    return None


def _serial(b: bytes) -> str:
    h = b[::-1].hex().upper()
    return f"{h[:4]}-{h[4:]}"
