"""Opening one stored block: decrypt its payload, decode it and prove it against its digest.

Restore, verify and the views (mount, NBD) read blocks only through here, so a grouped payload (codec 3:
consecutive blocks in one zstd frame, docs/FORMAT.md section 4) is handled in one place: each thread keeps
the last group it decoded, and the next block of that group is a slice of it instead of another decode."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal, Protocol, overload

from .codec import decode, decode_group
from .crypto import PointKeys
from .errors import IntegrityError
from .format import spec


class Sealed(Protocol):
    """What the opener needs of the point that holds a payload (a PointReader)."""

    @property
    def header(self) -> spec.PointHeader: ...

    def keys(self) -> PointKeys: ...


class _Last(threading.local):
    reader: object | None = None
    offset: int = -1
    data: bytes = b""
    whole: bool = False  # data is the whole group, not the part before some block


def block_digest(keys: PointKeys | None) -> Callable[[bytes | memoryview], bytes]:
    """A block's digest as the chain's maps record it: plain BLAKE3, or keyed under an encrypted chain's
    digest key. Chosen once, not per block."""
    return spec.b3 if keys is None else keys.digest


class BlockOpener:
    def __init__(self, keys: PointKeys | None) -> None:
        self.digest = block_digest(keys)
        self._last = _Last()

    @overload
    def open(self, reader: Sealed, block: int, codec: int, key: int, member: int, offset: int,
             payload: bytes | memoryview, raw_length: int, block_size: int, digest: bytes | None,
             upto: int | None = None, borrow: Literal[False] = False) -> bytes: ...  # fmt: skip

    @overload
    def open(self, reader: Sealed, block: int, codec: int, key: int, member: int, offset: int,
             payload: bytes | memoryview, raw_length: int, block_size: int, digest: bytes | None,
             upto: int | None = None, *, borrow: bool) -> bytes | memoryview: ...  # fmt: skip

    def open(self, reader: Sealed, block: int, codec: int, key: int, member: int, offset: int,
             payload: bytes | memoryview, raw_length: int, block_size: int, digest: bytes | None,
             upto: int | None = None, borrow: bool = False) -> bytes | memoryview:  # fmt: skip
        """The block's bytes, proven against `digest` (None: the caller proves them itself, later);
        IntegrityError says why not (the caller names the file and block). `upto`: the last position of its
        group wanted now (a random read): the group is decoded that far, not to its end. `borrow`: a block of
        a group comes as a view into the decoded group, not a copy (for a caller that is done with it before
        the next group: kept, it keeps the whole group)."""
        if codec == spec.PAYLOAD_ZSTD_GROUP:
            end = None if upto is None else (max(upto, member) + 1) * block_size
            raw = self._member(reader, block, key, member, offset, payload, raw_length, block_size, end, borrow)
        else:
            if reader.header.encrypted:
                payload = reader.keys().open_payload(block, codec, payload, key)
            raw = decode(codec, payload, raw_length)
        if digest is not None and not self.proves(raw, digest):
            raise IntegrityError("digest mismatch")
        return raw

    def proves(self, raw: bytes | memoryview, digest: bytes) -> bool:
        return self.digest(raw) == digest

    def _member(self, reader: Sealed, block: int, key: int, member: int, offset: int, payload: bytes | memoryview,
                raw_length: int, block_size: int, upto: int | None, borrow: bool) -> bytes | memoryview:  # fmt: skip
        first = block - member  # a group holds consecutive blocks: member m is block first + m
        if first < 0:
            raise IntegrityError(f"group position {member} is past the volume's start")
        last = self._last
        at = member * block_size
        if last.reader is reader and last.offset == offset and (last.whole or len(last.data) >= at + raw_length):
            data = last.data
        else:
            if reader.header.encrypted:  # sealed once, under the nonce of its first block
                payload = reader.keys().open_payload(first, spec.PAYLOAD_ZSTD_GROUP, payload, key)
            data = decode_group(payload, upto)
            last.reader, last.offset, last.data, last.whole = reader, offset, data, upto is None
        raw = memoryview(data)[at : at + raw_length] if borrow else data[at : at + raw_length]
        if len(raw) != raw_length:
            raise IntegrityError(f"its group of {len(data)} bytes holds no block at position {member}")
        return raw

    def forget(self) -> None:
        """Drop this thread's decoded group (a few MiB) once it is no longer needed."""
        self._last.reader, self._last.offset, self._last.data, self._last.whole = None, -1, b"", False
