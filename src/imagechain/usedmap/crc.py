"""Castagnoli CRCs (CRC-32C), as ext4's metadata_csum and XFS v5 protect their structures, from the
`crc32c` library (hardware instructions where the CPU has them)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterable
from types import ModuleType

import numpy as np


def _extension() -> ModuleType:
    """crc32c's C extension alone. The package's __init__ also looks up its own version through
    importlib.metadata and loads its command line: 30-40 ms of every cold start of a backup, for nothing
    used here. The extension lies next to that __init__; anything unexpected falls back to the package."""
    name = "crc32c._crc32c"
    try:
        spec = importlib.util.find_spec("crc32c")  # finds the package without running it
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_crc32c" + suffix)
                if os.path.isfile(path):
                    loader = importlib.machinery.ExtensionFileLoader(name, path)
                    found = importlib.util.spec_from_file_location(name, path, loader=loader)
                    if found is None:
                        break
                    module = importlib.util.module_from_spec(found)
                    loader.exec_module(module)
                    sys.modules.setdefault(name, module)  # a later `import crc32c` reuses it
                    if callable(getattr(module, "crc32c", None)):
                        return module
    except (ImportError, OSError):
        pass
    import crc32c

    return crc32c


_crc32c = _extension()


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
