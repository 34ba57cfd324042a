"""Castagnoli CRCs (CRC-32C), as ext4's metadata_csum and XFS v5 protect their structures, from the
`crc32c` library (hardware instructions where the CPU has them)."""

from __future__ import annotations

from collections.abc import Iterable

import crc32c as _crc32c
import numpy as np


def crc32c(data: bytes | memoryview) -> int:
    """The standard CRC-32C (initial value and result inverted): XFS stores this."""
    return int(_crc32c.crc32c(data))


def crc32c_raw(seed: int, data: bytes | memoryview) -> int:
    """CRC-32C continued from a raw register value, with no final inversion: ext4 seeds its checksums with
    a per-filesystem value and stores the register as it is."""
    return int(_crc32c.crc32c(data, seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF


def crc32c_rows(seed: int, rows: Iterable[np.ndarray]) -> np.ndarray:
    """crc32c_raw of every row (many bitmaps or descriptors at once)."""
    return np.array([crc32c_raw(seed, np.ascontiguousarray(r).data) for r in rows], np.int64)
