"""The few Linux calls Python's os module lacks, declared once: fallocate with a mode (punch a hole,
allocate without growing), sync_file_range, syncfs, renameat2, and the raw syscall (ioprio has no wrapper). They
come from the C library already loaded: ctypes.util.find_library would run ldconfig in a subprocess."""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SYNC_FILE_RANGE_WRITE = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_syncfs = getattr(_libc, "syncfs", None)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD, RENAME_NOREPLACE = -100, 1


def punch_hole(fd: int, offset: int, length: int, path: str | None = None) -> bool:
    """Make a file's bytes read as zeros without writing them. False where the filesystem cannot (the
    caller then writes zeros); any other failure is an OSError."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code), path)


def preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate a file's bytes in one go, its size unchanged. Only a hint: a failure is the later write's
    to report."""
    _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these dirty bytes to the disk now, without waiting. Only a hint."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> None:
    """Write out what is dirty on the filesystem holding fd. Only a hint where the call is missing."""
    if _syncfs is not None:
        _syncfs(fd)


def syscall(number: int, *args: int) -> tuple[int, int]:
    """A raw system call: (its result, errno when that result is negative)."""
    value = int(_libc.syscall(number, *args))
    return value, ctypes.get_errno() if value < 0 else 0


def rename_noreplace(src: str, dst: str) -> bool:
    """Rename src to dst unless dst exists (FileExistsError then). False where the filesystem or the C
    library cannot promise that (FUSE drivers without rename2, for one): nothing was renamed."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), src, None, dst)
