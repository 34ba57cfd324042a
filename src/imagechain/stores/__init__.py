"""Where image files live. The engine talks to a Store, chosen by the repository's location (docs/STORES.md):
a local folder (`/path`, `file:///path`), an SFTP server (`sftp://[user@]host[:port]/path`) or S3-compatible
object storage (`s3://bucket/prefix`). Only this package knows which; everything else sees a Store."""

from __future__ import annotations

import re

from ..errors import UsageError
from .base import TEMP_MARK, AtomicWriter, RandomReader, Store, StoreEntry, temporary_name, temporary_of
from .local import LocalStore

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_remote(location: str) -> bool:
    m = _URL.match(location)
    return m is not None and m.group(1).lower() != "file"


def local_path(location: str) -> str:
    """The folder a local location names (`file:///x` or a plain path)."""
    if location.lower().startswith("file://"):
        from urllib.parse import unquote, urlsplit  # here: a plain path (most runs) needs neither

        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{location}: a file:// URL names a folder on this machine (file:///path)")
        return unquote(parts.path)
    return location


def open_store(location: str) -> Store:
    """The store a repository location names. Remote stores connect lazily: nothing is sent until used."""
    m = _URL.match(location)
    scheme = m.group(1).lower() if m else "file"
    if scheme == "file":
        return LocalStore(local_path(location))
    if scheme == "sftp":
        from .sftp import SftpStore

        return SftpStore(location)
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(location)
    raise UsageError(f"{location}: unknown kind of repository location {scheme}:// (use a path, file://, sftp:// "
                     f"or s3://)")  # fmt: skip


def parent_location(location: str) -> tuple[str, str]:
    """(the location of the folder holding it, its name) for a file's location, local or remote."""
    head, _, name = location.rstrip("/").rpartition("/")
    return head or "/", name


__all__ = ["TEMP_MARK", "AtomicWriter", "LocalStore", "RandomReader", "Store", "StoreEntry", "is_remote",
           "local_path", "open_store", "parent_location", "temporary_name", "temporary_of"]  # fmt: skip
