"""The state digest: one hash over a point's whole block map, the proof that a chain's indexes add up
to exactly the volume that was backed up (docs/FORMAT.md section 8)."""

from __future__ import annotations

import struct

import blake3
import numpy as np

STATE_PREFIX = b"imagechain-state-v1\0"


def state_digest(volume_size: int, block_size: int, kinds_hash: bytes, digests_hash: bytes) -> bytes:
    return blake3.blake3(
        STATE_PREFIX + struct.pack("<QI", volume_size, block_size) + kinds_hash + digests_hash
    ).digest()


class StateHasher:
    """The state digest of a map streamed in block order, a window at a time."""

    def __init__(self, volume_size: int, block_size: int) -> None:
        self.volume_size, self.block_size = volume_size, block_size
        self._k, self._d = blake3.blake3(), blake3.blake3()

    def update(self, kinds: np.ndarray, digests: np.ndarray) -> None:
        self._k.update(np.ascontiguousarray(kinds).data)
        self._d.update(np.ascontiguousarray(digests).data)

    def digest(self) -> bytes:
        return state_digest(self.volume_size, self.block_size, self._k.digest(), self._d.digest())
