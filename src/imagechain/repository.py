"""A repository: a folder of plain files holding the chains of many hosts and sources.

Layout (docs/REPOSITORY.md):
  imagechain.json                           marker: this folder is a repository
  locks/<host8>-<source8>-<chain8>.lock     one writer per chain
  <host>-<host8>/<source>-<source8>/<chain>-<chain8>/<time>-<seq>-<full|incr>-<point8>[.sNNN].icimg
Paths are a convenience for people; points are found by reading file headers."""

from __future__ import annotations

import json
import os
import shlex
from datetime import UTC, datetime

import blake3

from .chain import Catalog, scan
from .errors import RepositoryError
from .format.writer import EXTENSION
from .names import component, timestamp
from .stores import LocalStore, Store, is_remote, local_path, open_store

MARKER = "imagechain.json"


def chain_key(chain_name: str) -> str:
    return blake3.blake3(b"imagechain-chain\0" + chain_name.encode()).hexdigest()[:8]


class Repository:
    def __init__(self, store: Store, display: str) -> None:
        self.store, self.display = store, display

    @classmethod
    def open(cls, location: str, create: bool = False) -> Repository:
        """The repository at location (a path or a URL, see stores). Only with create (imagechain init,
        backup --init) is a missing folder made or a folder without the marker turned into a repository:
        an empty mount point whose disk is not mounted must not quietly become one on the root filesystem."""
        how = f"create one with: imagechain init {shlex.quote(location)} (or backup --init)"
        if is_remote(location):
            store = open_store(location)
            if not store.root_exists():
                if not create:
                    raise RepositoryError(store.missing_root() or f"repository not found: {location}; {how}")
                store.make_root()
            return cls._marked(cls(store, location), create, how)
        path = local_path(location)
        try:
            os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as e:  # ENOTCONN (a FUSE driver gone), EIO: the disk, not a missing folder
            raise RepositoryError(f"cannot read repository {path}: {e.strerror or e}") from e
        if create and not os.path.isfile(os.path.join(path, MARKER)):
            _refuse_nesting(path)
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise RepositoryError(f"repository is not a folder: {path}")
            if not create:
                raise RepositoryError(f"repository not found: {path}; {how}")
            try:
                os.makedirs(path, exist_ok=True)  # two first backups may race here: both go on
            except OSError as e:
                raise RepositoryError(f"cannot create repository {path}: {e.strerror}") from e
        return cls._marked(cls(LocalStore(path), location), create, how)

    @classmethod
    def _marked(cls, repo: Repository, create: bool, how: str) -> Repository:
        if not repo.store.exists(MARKER):
            if not create:
                raise RepositoryError(f"{repo.display} is not an imagechain repository (it has no {MARKER}); is "
                                      f"the disk mounted? ({how})")  # fmt: skip
            marker = {"format": "imagechain-repository", "version": 1,
                      "created": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
            repo.store.create_exclusive(MARKER, json.dumps(marker, indent=1).encode())  # False: a racer made it
        return repo

    def holds(self, path: str) -> bool:
        """Does the local path lie in this repository's folder (or is it that folder)? What is written there
        would be read as part of the repository; a remote one holds no local path."""
        root = getattr(self.store, "root", None)
        return root is not None and within(path, root)

    @classmethod
    def around(cls, folder: str) -> Repository:
        """The folder holding an image file that lies outside any repository (copied alone somewhere)."""
        return cls(LocalStore(folder), folder)

    def catalog(self, prefix: str = "") -> Catalog:
        """Every point below prefix (the whole repository by default), found by reading file headers; a
        remote store's are remembered in the local catalog cache (catalog_cache.py)."""
        try:
            return scan(self.store, prefix)
        except OSError as e:  # the disk went away (ENOTCONN from a dead FUSE driver, EIO): name the cause
            raise RepositoryError(f"cannot read repository {self.display}: {e.strerror or e}"
                                  f"{f' ({e.filename})' if e.filename else ''}") from e

    @staticmethod
    def chain_dir(host_name: str, host_id: bytes, source_name: str, source_id: bytes, chain: str) -> str:
        return "/".join((component(host_name, host_id.hex()[:8]), component(source_name, source_id.hex()[:8]),
                         component(chain, chain_key(chain))))  # fmt: skip

    @staticmethod
    def lock_name(host_id: bytes, source_id: bytes, chain: str) -> str:
        return f"locks/{host_id.hex()[:8]}-{source_id.hex()[:8]}-{chain_key(chain)}.lock"

    @staticmethod
    def point_base(chain_dir: str, created_us: int, sequence: int, full: bool, point_hex: str) -> str:
        kind = "full" if full else "incr"
        return f"{chain_dir}/{timestamp(created_us)}-{sequence:04d}-{kind}-{point_hex[:8]}"


def within(path: str, folder: str) -> bool:
    """Is path folder itself or below it, symlinks resolved?"""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _refuse_nesting(path: str) -> None:
    """A repository is every image file below its folder, whatever the path: one made inside another (or
    around one) would have its points listed, pruned and consolidated by the other too, under another
    folder of locks."""
    real = os.path.realpath(path)
    up = find_root(real)  # the nearest folder above with the marker (else real's own folder)
    if os.path.isfile(os.path.join(up, MARKER)):
        raise RepositoryError(f"{path} lies inside the repository {up}: a repository inside another would be "
                              f"read as part of it; use {up} itself, or a folder outside it")  # fmt: skip

    def fail(e: OSError) -> None:
        if isinstance(e, FileNotFoundError):
            return  # the folder is still to be made (or a subfolder went meanwhile)
        raise RepositoryError(f"cannot read {e.filename or path} (looking for repositories inside {path}): "
                              f"{e.strerror or e}")  # fmt: skip

    for top, _dirs, names in os.walk(real, onerror=fail):
        if MARKER in names and os.path.isfile(os.path.join(top, MARKER)):
            raise RepositoryError(f"{path} holds the repository {top}: a repository around another would read "
                                  f"its points as its own; use {top} itself, or another folder")  # fmt: skip


def find_root(path: str) -> str:
    """The repository holding an image file: the nearest folder upwards with the marker, else its folder."""
    d = os.path.dirname(os.path.abspath(path))
    probe = d
    while True:
        if os.path.isfile(os.path.join(probe, MARKER)):
            return probe
        up = os.path.dirname(probe)
        if up == probe:
            return d
        probe = up


__all__ = ["EXTENSION", "MARKER", "Repository", "chain_key", "find_root", "within"]
