"""A file written under a temporary name beside the name it will appear under (a restore's new volume, an
export's image), or a folder a copy is staged in (restore-files), outside any repository and so outside any
chain lock.

Its writer holds an exclusive flock on it for as long as the writer lives; the kernel drops that lock when
the process ends, however it ends. So the next writer to the same name tells a killed writer's leftover (no
lock: it never became whole, and may be as big as a volume) from a running writer's (locked), and removes
only the former. Where the filesystem has no locks, nothing is locked and nothing is removed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat

from . import libc
from .stores import temporary_name, temporary_of

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF)


def in_dev(path: str) -> bool:
    """Does path lie under /dev, where a missing name is a device not attached, never a file to make?
    /dev/shm is the exception: a tmpfs for files."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path))) + "/"
    return folder.startswith("/dev/") and not folder.startswith("/dev/shm/")


def create(final: str, folder: bool = False) -> tuple[int, str]:
    """A new, locked temporary for `final` (an empty folder with `folder`): (descriptor, path). The lock
    lasts until the descriptor is closed, and in every process the descriptor is passed to.

    A sweep may lock a temporary in the instant between its creation and its creator's lock; the sweep
    then removes it while holding the lock, and the creator, locking after it, finds its name gone and
    takes another."""
    while True:
        tmp = temporary_name(final)
        if folder:
            os.mkdir(tmp, 0o700)
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return fd, tmp  # no locks here: no sweep removes anything either
            os.close(fd)
            raise
        try:
            mine = os.stat(tmp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            mine = False
        if mine:
            return fd, tmp
        os.close(fd)


def sweep(final: str, folders: bool = False) -> list[tuple[str, int]]:
    """Remove the temporaries of `final` (folders, with `folders`) that no living writer holds: (path, bytes)
    of each one removed. Best effort: what cannot be listed, opened or locked is left as it is."""
    folder, base = os.path.split(os.path.abspath(final))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if temporary_of(name) != base:
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY if folders else os.O_RDWR) | os.O_NOFOLLOW
                         | os.O_NONBLOCK)  # fmt: skip
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not (stat.S_ISDIR if folders else stat.S_ISREG)(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a running writer's (or a filesystem without locks)
            with contextlib.suppress(OSError):
                # removed while locked: a creator that lost the race sees its name gone
                if os.stat(path).st_ino == st.st_ino:
                    if folders:
                        size = _tree_bytes(path)
                        remove(path)
                    else:
                        size = st.st_size
                        os.unlink(path)
                    removed.append((path, size))
        finally:
            os.close(fd)
    return removed


def remove(folder: str) -> None:
    """Remove a temporary folder and all it holds, however its copy left it (modes that forbid writing)."""
    shutil.rmtree(folder, ignore_errors=True)


def _tree_bytes(folder: str) -> int:
    total = 0
    for top, _dirs, names in os.walk(folder):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, n)).st_size
    return total


def publish(tmp: str, final: str) -> None:
    """Give a finished temporary (a file or a symlink) its final name, never over a file that took that name meanwhile
    (FileExistsError). A hard link where the filesystem has them, else a rename that refuses to replace;
    the FUSE FAT drivers offer neither, and there the name is checked free just before a plain rename."""
    try:
        os.link(tmp, final, follow_symlinks=False)  # a symlink stays one (restore-files moves them too)
        os.unlink(tmp)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    if libc.rename_noreplace(tmp, final):
        return
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
    os.rename(tmp, final)
