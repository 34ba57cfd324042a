"""Reflink clones of image files (FICLONE): a copy that shares every extent with the original, made in
milliseconds whatever the file's size, on filesystems that support it (XFS with reflink, btrfs).

The clone never has a name: it is made in an O_TMPFILE of the image's folder (or, where O_TMPFILE is
missing, a file unlinked right after it is created), so a backup that dies, even by SIGKILL, leaves
nothing behind: the kernel frees the clone's extents when its last descriptor closes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct

from ..errors import SnapshotError

FICLONE = 0x40049409
FICLONERANGE = 0x4020940D
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EBADF)


def _anonymous_file(folder: str) -> int:
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = os.path.join(folder, f".imagechain-clone-{os.urandom(8).hex()}")
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(name)
    return fd


def supported(path: str) -> str:
    """"" when image files in `path`'s folder can be cloned, else why not (one phrase). Clones one
    filesystem block of the file, which costs nothing and proves the filesystem, the folder's
    permissions and the file's type all allow it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        st = os.fstat(src)
        block = os.statvfs(folder).f_bsize
        if st.st_size < block:
            return f"{path} is smaller than one filesystem block"
        dst = _anonymous_file(folder)
        try:
            fcntl.ioctl(dst, FICLONERANGE, struct.pack("=qQQQ", src, 0, block, 0))
        finally:
            os.close(dst)
    except OSError as e:
        if e.errno in _NO_REFLINK:
            return "its filesystem does not support reflink clones"
        return f"cannot clone {path}: {e.strerror}"
    finally:
        os.close(src)
    return ""


def clone(path: str) -> int:
    """A descriptor of a nameless reflink clone of the file at `path`, open for reading."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open {path} to clone it: {e.strerror}") from e
    try:
        dst = _anonymous_file(folder)
    except OSError as e:
        os.close(src)
        raise SnapshotError(f"cannot create a clone of {path} in {folder}: {e.strerror}") from e
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as e:
        os.close(dst)
        why = "its filesystem does not support reflink clones" if e.errno in _NO_REFLINK else e.strerror
        raise SnapshotError(f"cannot make a reflink clone of {path}: {why}") from e
    finally:
        with contextlib.suppress(OSError):
            os.close(src)
    return dst
