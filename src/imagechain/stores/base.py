"""The store contract: the smallest set of operations a remote store can offer efficiently.

Names are relative, '/'-separated and portable (see names.py). Only `AtomicWriter.commit` makes a file
visible under its final name; a crash before that leaves at most a temporary that readers ignore."""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

_COUNT_LOCK = threading.Lock()
TEMP_MARK = ".tmp-"  # temporaries are named <final name>.tmp-<8 lowercase hex digits>
_TEMPORARY = re.compile(r"^(.+)\.tmp-[0-9a-f]{8}$")


def temporary_name(final: str) -> str:
    """A fresh temporary name for a file to be published as `final` (docs/FORMAT.md section 9)."""
    return f"{final}{TEMP_MARK}{os.urandom(4).hex()}"


def temporary_of(name: str) -> str | None:
    """The final name a temporary will be published under; None when name is no temporary."""
    m = _TEMPORARY.match(name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class StoreEntry:
    name: str
    size: int
    tag: str = ""  # remote stores: what changes when the file's bytes change (ETag, mtime); caches key on it


class AtomicWriter(ABC):
    """A file being written; invisible under its final name until commit."""

    name: str

    @abstractmethod
    def write(self, data: bytes | memoryview) -> int:
        """Append data; returns bytes written, which is less than len(data) only when the
        file reached the store's size limit (the caller continues in a new file)."""

    @abstractmethod
    def tell(self) -> int: ...

    @abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable (still under the temporary name)."""

    @abstractmethod
    def commit(self) -> None:
        """Publish under the final name, durably."""

    @abstractmethod
    def abort(self) -> None: ...

    def read_back(self, offset: int, length: int) -> bytes | None:
        """What was written, read back from the store before commit (replication proves its copies so);
        None where the store cannot (it then vouches for uploads by its own checksums)."""
        return None


class RandomReader(ABC):
    """An open file for ranged reads (a file handle locally, ranged GETs remotely)."""

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    url: str
    remote = False  # reads cost a round trip: the catalog caches what it reads of each file (catalog.py)
    bytes_read = 0  # bytes this store object read from its files (reports, benchmarks)

    def counted(self, data: bytes) -> bytes:
        """data, added to bytes_read (stores call it on everything they read)."""
        with _COUNT_LOCK:
            self.bytes_read += len(data)
        return data

    def root_exists(self) -> bool:
        """Whether the folder (prefix, bucket) the store is rooted at exists."""
        return True

    def missing_root(self) -> str | None:
        """When root_exists() is False: a line saying what is missing, if more than the folder (a bucket)."""
        return None

    @abstractmethod
    def make_root(self) -> None:
        """Create the root folder for `imagechain init`; stores whose root cannot be made here raise."""

    @abstractmethod
    def open(self, name: str) -> RandomReader: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[StoreEntry]:
        """Every file below prefix (recursive), temporaries included."""

    @abstractmethod
    def read(self, name: str, offset: int, length: int) -> bytes:
        """Up to length bytes at offset (fewer only at end of file)."""

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def create(self, name: str) -> AtomicWriter: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def rename(self, name: str, new_name: str) -> None:
        """Atomically give a file its final name, durably (publishing a recovered temporary)."""

    @abstractmethod
    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create name with data unless it exists; False when it exists. Used for locks."""

    def replace(self, name: str, data: bytes) -> None:
        """Atomically replace a small file's content (lock refresh, markers): written under a temporary and
        committed over it; stores that replace objects atomically anyway (S3) do it in one request."""
        w = self.create(name)
        try:
            w.write(data)
            w.commit()
        except BaseException:
            w.abort()
            raise

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    def abort_uploads(self, prefix: str) -> int:
        """Drop unfinished uploads below prefix (S3 multipart uploads of a writer that died); the caller
        holds the lock of every chain there, so none of them is still being written. Returns how many."""
        return 0

    def patch(self, name: str, offset: int, data: bytes) -> None:
        """Overwrite bytes of a published file in place, durably. Only for regions that prove themselves
        (an encrypted point's key slots, docs/FORMAT.md section 11); stores that cannot raise."""
        raise NotImplementedError(f"{type(self).__name__} cannot change a file in place")

    @abstractmethod
    def filesystem(self) -> str:
        """The filesystem type holding the store ('ext4', 'vfat', 'exfat', 'ntfs', '' if unknown);
        decides automatic segment splitting."""
