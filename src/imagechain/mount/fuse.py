"""A read-only FUSE filesystem over a point view: `disk.img`, one `part<N>.img` per partition of a disk
point (windows of the volume), and empty folders on which the filesystems inside are mounted.

The tree never changes, so the kernel may cache names, attributes and data for as long as it likes
(`kernel_cache`, long timeouts): a second read of a block costs no call into Python, and a mount on one of
our folders stays reachable after the server died, so that it can still be unmounted. A block that fails its
proof is answered with EIO for that read alone (the message is logged once); every other read goes on.

libfuse runs on a thread of its own with the stop signals blocked: the main thread keeps Python's handlers
(libfuse installs its own only where none is set), so a stop takes the filesystems inside down before the
FUSE filesystem goes, instead of libfuse detaching the whole tree from under them."""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mfusepy

from ..errors import ImagechainError, IntegrityError, MountError
from ..interrupts import STOP_SIGNALS, join_started
from ..view import PointView
from . import system
from .state import FSTYPE

CACHE_TIMEOUT_S = 86400.0


@dataclass(frozen=True)
class Image:
    """A file of the FUSE filesystem: a window of the volume."""

    name: str  # disk.img, part1.img
    offset: int
    length: int
    number: int | None = None  # the partition's, for part<N>.img


class PointFS(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True  # times as integer nanoseconds (mfusepy's modern convention)

    def __init__(self, view: PointView, images: list[Image], folders: list[str], mtime_ns: int,
                 log: Callable[[str], None]) -> None:  # fmt: skip
        self.view, self.log = view, log
        self.images = {"/" + i.name: i for i in images}
        self.folders = {"/", *("/" + f for f in folders)}
        for f in folders:  # every parent of a folder is a folder
            parts = f.split("/")
            self.folders.update("/" + "/".join(parts[:k]) for k in range(1, len(parts)))
        self.mtime_ns = mtime_ns
        self.uid, self.gid = os.getuid(), os.getgid()
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        base = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": self.mtime_ns, "st_mtime": self.mtime_ns,
                "st_ctime": self.mtime_ns}  # fmt: skip
        if path in self.folders:
            return {**base, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        img = self.images.get(path)
        if img is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return {**base, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": img.length,
                "st_blocks": -(-img.length // 512), "st_blksize": self.view.block_size}  # fmt: skip

    def readdir(self, path: str, fh: int) -> list[str]:
        if path not in self.folders:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix) :].split("/")[0] for p in [*self.folders, *self.images] if p.startswith(prefix)}
        return [".", "..", *sorted(n for n in names if n)]

    def open(self, path: str, flags: int) -> int:
        if path not in self.images:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        img = self.images.get(path)
        if img is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        n = min(size, img.length - offset)
        if n <= 0:
            return b""
        try:
            return self.view.read(img.offset + offset, n)
        except IntegrityError as e:
            self._once(f"{img.name}: bytes {offset}..{offset + n} unreadable (answered EIO): {e}")
        except (ImagechainError, OSError) as e:
            self._once(f"{img.name}: reading bytes {offset}..{offset + n} failed (answered EIO): {e}")
        raise mfusepy.FuseOSError(errno.EIO)

    def statfs(self, path: str) -> dict[str, int]:
        bs = self.view.block_size
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": -(-self.view.size // bs), "f_bfree": 0, "f_bavail": 0,
                "f_files": len(self.images) + len(self.folders), "f_ffree": 0, "f_namemax": 255}  # fmt: skip

    def _once(self, message: str) -> None:
        """One line per distinct failure: a reader that retries (or the kernel's read-ahead) does not flood."""
        with self._lock:
            if message in self._said:
                return
            self._said.add(message)
        self.log(message)


class Server:
    """libfuse's loop for one mount point, on a thread of its own."""

    def __init__(self, fs: PointFS, mountpoint: str, allow_other: bool) -> None:
        self.fs, self.mountpoint, self.allow_other = fs, mountpoint, allow_other
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fuse", daemon=True)

    def _run(self) -> None:
        # libfuse's worker threads inherit this mask: stop signals reach the main thread only
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        options: dict[str, Any] = {"ro": True, "fsname": "imagechain", "subtype": "imagechain", "kernel_cache": True,
                                   "entry_timeout": CACHE_TIMEOUT_S, "attr_timeout": CACHE_TIMEOUT_S,
                                   "default_permissions": True}  # fmt: skip
        if self.allow_other:
            options["allow_other"] = True
        try:
            mfusepy.FUSE(self.fs, self.mountpoint, foreground=True, **options)
        except BaseException as e:  # reported by wait_live, or by the serving loop
            self.error = e

    def start(self) -> None:
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def wait_live(self, timeout: float) -> None:
        """Until the kernel shows the mount and it answers; MountError if libfuse gave up."""
        deadline = time.monotonic() + timeout
        probe = os.path.join(self.mountpoint, next(iter(self.fs.images))[1:])
        while True:
            if not self.thread.is_alive():
                why = f" ({type(self.error).__name__}: {self.error})" if self.error is not None else ""
                raise MountError(f"the FUSE mount at {self.mountpoint} failed{why} (is /dev/fuse there, and "
                                 f"fuse3 installed? libfuse's own message is above)")  # fmt: skip
            top = system.mount_at(self.mountpoint)
            if top is not None and top.fstype == FSTYPE:
                try:
                    os.stat(probe)
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise MountError(f"the FUSE mount at {self.mountpoint} did not come up within {timeout:.0f} s")
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        join_started(self.thread, timeout)
