"""Byte layout of image files. Every constant here is mirrored by a table in docs/FORMAT.md,
and tests/test_format_spec.py keeps the two in step."""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass, field

import blake3
import numpy as np

from ..errors import IntegrityError

FORMAT_MAJOR = 1
# 1.1: frame directory after the index (section 5.1); 1.2: UNUSED blocks, layout; 1.3: encryption; 1.4: merged
# points; 1.5: grouped payloads (codec 3, index entry field `member`)
FORMAT_MINOR = 5

# --- segment header: the first bytes of every file of a point -----------------------------------
SEGMENT_MAGIC = b"ICHSEG01"
SEGMENT_HEADER = struct.Struct("<8sHHI16sQ16s")  # magic, major, flags, number, point id, logical offset, rsvd
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 8  # + truncated BLAKE3 checksum
assert SEGMENT_HEADER_SIZE == 64

# --- point header: logical offset 0 -------------------------------------------------------------
HEADER_MAGIC = b"IMGCHAIN"
HEADER_FIXED = struct.Struct(
    "<8sHHI"  # magic, major, minor, header length
    "16s16s16s32s"  # point id, chain id, parent point id, parent state digest
    "16s16s"  # host id, source id
    "IIQq"  # sequence, block size, volume size, created (µs since epoch, UTC)
    "BBBbB3s"  # kind, digest algorithm, compression, compression level, encryption, reserved
    "QII"  # split size, key material length, metadata length
    "80s"  # reserved
)
HEADER_FIXED_SIZE = HEADER_FIXED.size
assert HEADER_FIXED_SIZE == 256
HEADER_MAC_SIZE = 32

KIND_FULL = 0
KIND_INCREMENTAL = 1

DIGEST_BLAKE3 = 1
DIGEST_BLAKE3_KEYED = 2  # reserved for encrypted chains

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_LZ4 = 2

ENCRYPTION_NONE = 0
ENCRYPTION_AES256GCM = 1  # reserved

# --- index entries ------------------------------------------------------------------------------
BLOCK_DATA = 1
BLOCK_ZERO = 2
BLOCK_UNUSED = 3  # reserved for used-block maps

PAYLOAD_RAW = 0  # per-entry codec: stored as is (compression did not help)
PAYLOAD_ZSTD = 1
PAYLOAD_LZ4 = 2
PAYLOAD_ZSTD_GROUP = 3  # 1.5: one zstd frame holding consecutive blocks; the entry's `member` says which one
GROUP_MAX_BYTES = 64 << 20  # a reader refuses a group that decodes to more (a writer aims for a few MiB)

INDEX_ENTRY = np.dtype(
    [
        ("block", "<u8"),
        ("count", "<u4"),
        ("kind", "u1"),
        ("codec", "u1"),
        ("key", "<u2"),  # 1.4: which data key sealed the payload (0: the point's own; section 11.1)
        ("offset", "<u8"),
        ("length", "<u4"),
        ("member", "<u4"),  # 1.5: the block's position in its group (codec 3); zero otherwise
        ("digest", "u1", (32,)),
    ]
)
assert INDEX_ENTRY.itemsize == 64

# --- frame directory (1.1): where each index frame lies and which blocks it covers -------------------
FRAME_ENTRY = np.dtype(
    [
        ("first_block", "<u8"),
        ("end_block", "<u8"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("entries", "<u4"),
        ("digest", "u1", (32,)),
    ]
)
assert FRAME_ENTRY.itemsize == 64
DIRECTORY_DIGEST_SIZE = 24

# --- footer: the last bytes of the last segment ---------------------------------------------------
FOOTER_MAGIC = b"ICHEND01"
FOOTER = struct.Struct(
    "<16s"  # point id
    "QQQ32s"  # index offset, index length, index entry count, index digest
    "QI32s"  # summary offset, summary length, summary digest
    "I"  # segment count
    "32s32s"  # state digest, header digest
    "Q"  # logical length (everything, footer included)
    "24s"  # frame directory digest (BLAKE3/24; 1.1), zero in 1.0
)
FOOTER_SIZE = FOOTER.size + 32 + 8  # + checksum + trailing magic
assert FOOTER_SIZE == 256

ZERO_DIGEST = bytes(32)


def b3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class SegmentHeader:
    number: int
    point_id: uuid.UUID
    logical_offset: int

    def pack(self) -> bytes:
        raw = SEGMENT_HEADER.pack(
            SEGMENT_MAGIC, FORMAT_MAJOR, 0, self.number, self.point_id.bytes, self.logical_offset, bytes(16)
        )
        return raw + b3(raw)[:8]

    @classmethod
    def unpack(cls, raw: bytes, name: str, check: bool = True) -> SegmentHeader:
        """check=False skips the checksum (salvage: the point's assembly and its proofs still judge it)."""
        if len(raw) < SEGMENT_HEADER_SIZE or raw[:8] != SEGMENT_MAGIC:
            raise IntegrityError(f"{name}: not an imagechain image file")
        body, digest = raw[: SEGMENT_HEADER.size], raw[SEGMENT_HEADER.size : SEGMENT_HEADER_SIZE]
        if check and b3(body)[:8] != digest:
            raise IntegrityError(f"{name}: segment header checksum mismatch")
        _magic, major, _flags, number, pid, loff, _r = SEGMENT_HEADER.unpack(body)
        if major != FORMAT_MAJOR:
            raise IntegrityError(f"{name}: format version {major} is not supported (this is {FORMAT_MAJOR})")
        return cls(number, uuid.UUID(bytes=pid), loff)


@dataclass
class PointHeader:
    point_id: uuid.UUID
    chain_id: uuid.UUID
    parent_id: uuid.UUID | None
    parent_state: bytes
    host_id: bytes
    source_id: bytes
    sequence: int
    block_size: int
    volume_size: int
    created_us: int
    kind: int
    compression: int
    compression_level: int
    split_size: int
    metadata: dict[str, object] = field(default_factory=dict)
    digest_algorithm: int = DIGEST_BLAKE3
    encryption: int = ENCRYPTION_NONE
    key_material: bytes = b""
    minor: int = FORMAT_MINOR
    mac: bytes = field(default=b"", compare=False)  # as read: an encrypted header's MAC is keyed, proven with its keys

    @property
    def block_count(self) -> int:
        return -(-self.volume_size // self.block_size)

    @property
    def encrypted(self) -> bool:
        return self.encryption != ENCRYPTION_NONE

    def _masked(self, raw: bytes) -> bytes:
        """The header with its key material zeroed: what an encrypted header's MAC and digest cover, so
        that re-wrapping keys in place (key change-passphrase) changes neither."""
        if not self.encrypted:
            return raw
        a, z = HEADER_FIXED_SIZE, HEADER_FIXED_SIZE + len(self.key_material)
        return raw[:a] + bytes(z - a) + raw[z:]

    def pack(self, mac_key: bytes | None = None) -> bytes:
        """The header's bytes; an encrypted header is MAC'd with mac_key (keyed BLAKE3), or keeps the MAC
        it was read with."""
        meta = json.dumps(self.metadata, sort_keys=True, ensure_ascii=False).encode()
        length = HEADER_FIXED_SIZE + len(self.key_material) + len(meta) + HEADER_MAC_SIZE
        fixed = HEADER_FIXED.pack(
            HEADER_MAGIC, FORMAT_MAJOR, self.minor, length,
            self.point_id.bytes, self.chain_id.bytes,
            (self.parent_id.bytes if self.parent_id else bytes(16)), self.parent_state,
            self.host_id, self.source_id,
            self.sequence, self.block_size, self.volume_size, self.created_us,
            self.kind, self.digest_algorithm, self.compression, self.compression_level, self.encryption,
            bytes(3), self.split_size, len(self.key_material), len(meta), bytes(80),
        )  # fmt: skip
        body = fixed + self.key_material + meta
        if not self.encrypted:
            return body + b3(body)
        if mac_key is not None:
            self.mac = blake3.blake3(self._masked(body), key=mac_key).digest()
        if len(self.mac) != HEADER_MAC_SIZE:
            raise ValueError("an encrypted header needs its MAC key")
        return body + self.mac

    def digest(self) -> bytes:
        """What the footer's header_digest holds: BLAKE3 of the header (key material zeroed if encrypted)."""
        return b3(self._masked(self.pack()))

    def mac_matches(self, mac_key: bytes) -> bool:
        raw = self.pack()
        return blake3.blake3(self._masked(raw[:-HEADER_MAC_SIZE]), key=mac_key).digest() == self.mac

    @classmethod
    def unpack(cls, raw: bytes, name: str, check: bool = True) -> PointHeader:
        """The header; check=False skips the MAC and takes unreadable metadata as empty: for salvage,
        where the state digest, not the header, proves what is restored."""
        if len(raw) < HEADER_FIXED_SIZE or raw[:8] != HEADER_MAGIC:
            raise IntegrityError(f"{name}: point header missing (bad magic)")
        f = HEADER_FIXED.unpack(raw[:HEADER_FIXED_SIZE])
        (_m, major, minor, length, pid, cid, parent, pstate, host, source, seq, bs, vsize, created,
         kind, dalg, comp, level, enc, _r, split, klen, mlen, _r2) = f  # fmt: skip
        if major != FORMAT_MAJOR:
            raise IntegrityError(f"{name}: format version {major} is not supported")
        if length != HEADER_FIXED_SIZE + klen + mlen + HEADER_MAC_SIZE or len(raw) < length:
            raise IntegrityError(f"{name}: point header length fields are inconsistent")
        body, mac = raw[: length - HEADER_MAC_SIZE], raw[length - HEADER_MAC_SIZE : length]
        if check and enc == ENCRYPTION_NONE and b3(body) != mac:
            raise IntegrityError(f"{name}: point header checksum mismatch")
        try:
            meta = json.loads(body[HEADER_FIXED_SIZE + klen :].decode())
        except ValueError as e:
            if check:
                raise IntegrityError(f"{name}: point header metadata is not valid JSON") from e
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        return cls(
            point_id=uuid.UUID(bytes=pid), chain_id=uuid.UUID(bytes=cid),
            parent_id=None if parent == bytes(16) else uuid.UUID(bytes=parent), parent_state=pstate,
            host_id=host, source_id=source, sequence=seq, block_size=bs, volume_size=vsize,
            created_us=created, kind=kind, compression=comp, compression_level=level, split_size=split,
            metadata=meta, digest_algorithm=dalg, encryption=enc,
            key_material=body[HEADER_FIXED_SIZE : HEADER_FIXED_SIZE + klen], minor=minor, mac=mac,
        )  # fmt: skip

    @staticmethod
    def peek(raw: bytes) -> tuple[uuid.UUID, uuid.UUID | None, int] | None:
        """(chain id, parent id, sequence) from a header whose checksum fails: unproven, so used only to
        tell the user which chain a damaged point claims to continue, never to read data."""
        if len(raw) < HEADER_FIXED_SIZE or raw[:8] != HEADER_MAGIC:
            return None
        f = HEADER_FIXED.unpack(raw[:HEADER_FIXED_SIZE])
        parent = f[6]
        return uuid.UUID(bytes=f[5]), None if parent == bytes(16) else uuid.UUID(bytes=parent), int(f[10])

    @staticmethod
    def length_from_prefix(raw: bytes) -> int:
        """Total header length, read from the first 16 bytes."""
        return int(struct.unpack_from("<I", raw, 12)[0])


@dataclass(frozen=True)
class Footer:
    point_id: uuid.UUID
    index_offset: int
    index_length: int
    index_count: int
    index_digest: bytes
    summary_offset: int
    summary_length: int
    summary_digest: bytes
    segment_count: int
    state_digest: bytes
    header_digest: bytes
    logical_length: int
    directory_digest: bytes = bytes(DIRECTORY_DIGEST_SIZE)

    @property
    def directory_offset(self) -> int:
        """The frame directory lies between the index and the summary (1.1)."""
        return self.index_offset + self.index_length

    @property
    def directory_length(self) -> int:
        return self.summary_offset - self.directory_offset

    def pack(self) -> bytes:
        body = FOOTER.pack(
            self.point_id.bytes, self.index_offset, self.index_length, self.index_count, self.index_digest,
            self.summary_offset, self.summary_length, self.summary_digest, self.segment_count,
            self.state_digest, self.header_digest, self.logical_length, self.directory_digest,
        )  # fmt: skip
        return body + b3(body) + FOOTER_MAGIC

    @classmethod
    def unpack(cls, raw: bytes, name: str) -> Footer:
        if len(raw) != FOOTER_SIZE or raw[-8:] != FOOTER_MAGIC:
            raise IntegrityError(f"{name}: no footer (incomplete or truncated image file)")
        body, check = raw[: FOOTER.size], raw[FOOTER.size : FOOTER.size + 32]
        if b3(body) != check:
            raise IntegrityError(f"{name}: footer checksum mismatch")
        (pid, ioff, ilen, icount, idig, soff, slen, sdig, segs, state, hdig, llen, ddig) = FOOTER.unpack(body)
        if soff < ioff + ilen or soff + slen > llen:
            raise IntegrityError(f"{name}: footer offsets are inconsistent")
        return cls(uuid.UUID(bytes=pid), ioff, ilen, icount, idig, soff, slen, sdig, segs, state, hdig, llen, ddig)
