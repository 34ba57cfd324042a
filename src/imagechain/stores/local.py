"""A repository in a local folder: a USB disk, a mounted share, any filesystem.

Nothing but plain files: no links, permissions, xattrs or sparse files, and mtimes are never read.
Publishing is write-to-temporary, fsync, rename, fsync of the folder; new folders are fsynced into their
parents. Folder fsync errors fail the write, except on filesystems that cannot fsync a folder at all."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from ..errors import NoSpaceError, RepositoryError
from ..fsprobe import PROBE_BYTES, probe
from .base import TEMP_MARK, AtomicWriter, RandomReader, Store, StoreEntry, temporary_name

# errors meaning "this filesystem (or its FUSE driver) cannot fsync a folder", not "the data is at risk"
DROP_BEHIND = 64 << 20  # written bytes flushed and dropped from the page cache at a time
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR})
_NO_DIR_OPEN = _NO_DIR_FSYNC | {errno.EPERM, errno.EACCES}


def fsync_folder(path: str) -> None:
    """Make a folder's entries durable. Filesystems that cannot fsync a folder are let through; any
    other failure (EIO above all: an entry may be lost) raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _NO_DIR_OPEN:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """fsync_folder for the repository: a failure is the repository's."""
    try:
        fsync_folder(path)
    except OSError as e:
        _raise_io(e, f"folder {path} (fsync)")


def _make_dirs(path: str) -> None:
    """os.makedirs, durably: each folder created, and the folder it was created in, is fsynced, so a
    file published into it does not vanish with its folder in a crash."""
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    if not missing:
        return
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):  # a file in the way (not to be taken for an existing lock)
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d) from None
            # made at this moment by another writer: fsynced below all the same
    for d in missing:
        _fsync_dir(d)
    _fsync_dir(os.path.dirname(missing[-1]))


def _raise_io(e: OSError, what: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"repository full while writing {what}: {e.strerror}") from e
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise RepositoryError(f"repository not writable ({what}): {e.strerror}") from e
    raise RepositoryError(f"cannot write {what}: {e.strerror or e}") from e


SIZE_CAPS = ((1 << 31) - 1, (1 << 32) - 1)  # 2 GiB (fusefat, old FUSE and 32-bit drivers), FAT32's 4 GiB


def size_limit_reached(err: int | None, size: int, more: int) -> bool:
    """A refused write that means "this file cannot grow": EFBIG always; EPERM or EINVAL only when the
    write would take the file past a well-known size cap (fusefat answers EPERM at 2 GiB), so that
    other causes of those errors are still reported as what they are."""
    if err == errno.EFBIG:
        return True
    return err in (errno.EPERM, errno.EINVAL) and any(size <= cap < size + more for cap in SIZE_CAPS)


class _LocalWriter(AtomicWriter):
    def __init__(self, store: LocalStore, name: str) -> None:
        self.name = name
        self._store = store
        self._final = store.path(name)
        self._tmp = temporary_name(self._final)
        try:
            _make_dirs(os.path.dirname(self._final))
            self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
        except OSError as e:
            _raise_io(e, name)
        self._pos = 0
        self._synced = 0  # bytes already flushed and dropped from the page cache

    def write(self, data: bytes | memoryview) -> int:
        assert self._fd is not None
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.write(self._fd, view[done:])
            except OSError as e:
                if size_limit_reached(e.errno, self._pos + done, len(view) - done):
                    break  # the filesystem's file-size limit: the caller opens a new segment
                _raise_io(e, self.name)
            done += n
        self._pos += done
        if self._pos - self._synced >= DROP_BEHIND:
            self._drop_behind()
        return done

    def _drop_behind(self) -> None:
        """Image data just written is of no further use in the page cache: flush it and let it go, so that
        writing a backup neither evicts what the machine keeps cached nor piles up dirty pages."""
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            _raise_io(e, self.name)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, self._synced, self._pos - self._synced, os.POSIX_FADV_DONTNEED)
        self._synced = self._pos

    def tell(self) -> int:
        return self._pos

    def read_back(self, offset: int, length: int) -> bytes | None:
        try:
            fd = os.open(self._tmp, os.O_RDONLY | _BINARY)
            try:
                with contextlib.suppress(OSError):  # what was flushed, from the disk rather than the page cache
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as e:
            _raise_io(e, self.name)
            raise

    def flush(self) -> None:
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as e:
            _raise_io(e, self.name)

    def commit(self) -> None:
        assert self._fd is not None
        self.flush()
        os.close(self._fd)
        self._fd = None
        try:
            os.replace(self._tmp, self._final)
        except OSError as e:
            _raise_io(e, self.name)
        _fsync_dir(os.path.dirname(self._final))

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


_BINARY = getattr(os, "O_BINARY", 0)


class _LocalReader(RandomReader):
    def __init__(self, store: LocalStore, path: str) -> None:
        self._store = store
        self._fd = os.open(path, os.O_RDONLY | _BINARY)

    def pread(self, offset: int, length: int) -> bytes:
        return self._store.counted(os.pread(self._fd, length, offset))

    def close(self) -> None:
        os.close(self._fd)


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def make_root(self) -> None:
        try:
            _make_dirs(self.root)
        except OSError as e:
            _raise_io(e, self.root)

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/")) if name else self.root

    def list(self, prefix: str = "") -> Iterator[StoreEntry]:
        base = self.path(prefix)
        if prefix and not os.path.isdir(base):
            return  # nothing below a folder that does not exist (yet)

        def fail(e: OSError) -> None:  # a listing that skips what it cannot read would hide points
            if not (isinstance(e, FileNotFoundError) and e.filename != base):  # a subfolder removed meanwhile
                raise e

        for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile; any other error is the repository's, and is raised
                if stat.S_ISREG(st.st_mode):
                    yield StoreEntry(rel + fn, st.st_size)

    def open(self, name: str) -> RandomReader:
        return _LocalReader(self, self.path(name))

    def read(self, name: str, offset: int, length: int) -> bytes:
        with open(self.path(name), "rb") as f:
            return self.counted(os.pread(f.fileno(), length, offset))

    def size(self, name: str) -> int:
        return os.stat(self.path(name)).st_size

    def create(self, name: str) -> AtomicWriter:
        return _LocalWriter(self, name)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def rename(self, name: str, new_name: str) -> None:
        src, dst = self.path(name), self.path(new_name)
        try:
            fd = os.open(src, os.O_RDONLY | _BINARY)
            try:
                os.fsync(fd)  # its content first: it may have been written by a process that died
            finally:
                os.close(fd)
            _make_dirs(os.path.dirname(dst))
            os.replace(src, dst)
        except OSError as e:
            _raise_io(e, new_name)
        _fsync_dir(os.path.dirname(dst))
        if os.path.dirname(src) != os.path.dirname(dst):
            _fsync_dir(os.path.dirname(src))

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Written whole under a temporary name, then hard-linked to `name` (atomic, and refused when the
        name exists): a writer killed at any moment leaves no half-written file under `name`. Filesystems
        without hard links (FAT, exFAT) get an exclusive create and a write, which a kill can cut short."""
        p = self.path(name)
        try:
            _make_dirs(os.path.dirname(p))
        except OSError as e:
            _raise_io(e, name)
        tmp = temporary_name(p)
        try:
            self._write_new(tmp, data, name)
            try:
                os.link(tmp, p)
            except (FileExistsError, FileNotFoundError):  # taken; or the winner removed our temporary
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    _raise_io(e, name)
                return self._create_exclusive_direct(p, data, name)  # no hard links here
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # ours now: temporaries of the same name are of writers killed before their link, or losing now
        folder, base = os.path.split(p)
        with contextlib.suppress(OSError):
            for other in os.listdir(folder):
                if other.startswith(base + TEMP_MARK):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, other))
        _fsync_dir(folder)
        return True

    @staticmethod
    def _write_new(path: str, data: bytes, name: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
        except OSError as e:
            _raise_io(e, name)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            _raise_io(e, name)
        os.close(fd)

    def _create_exclusive_direct(self, p: str, data: bytes, name: str) -> bool:
        try:
            self._write_new(p, data, name)
        except (NoSpaceError, RepositoryError) as e:
            if isinstance(e.__cause__, FileExistsError):
                return False
            raise
        _fsync_dir(os.path.dirname(p))
        return True

    def patch(self, name: str, offset: int, data: bytes) -> None:
        try:
            fd = os.open(self.path(name), os.O_WRONLY | _BINARY)
        except OSError as e:
            _raise_io(e, name)
        try:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]
            os.fsync(fd)
        except OSError as e:
            _raise_io(e, name)
        finally:
            os.close(fd)

    def filesystem(self) -> str:
        return filesystem_of(self.root)


FAT_MAX_FILE = (4 << 30) - 1  # FAT32's largest file


def too_big_for_fat(path: str, size: int) -> bool:
    """Would a file of size bytes at path pass FAT32's largest file? (The mount is looked up only then.)"""
    return size > FAT_MAX_FILE and filesystem_of(os.path.dirname(os.path.abspath(path))) == "vfat"


def filesystem_of(path: str) -> str:
    """Filesystem type of the mount holding path, looking through FUSE to the device's superblock."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    best: tuple[int, str, str] = (-1, "", "")
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best[0]:
            best = (len(mnt), rfields[0], rfields[1])
    fstype, source = best[1], best[2]
    if fstype in ("vfat", "msdos", "exfat", "ntfs", "ntfs3"):
        return "ntfs" if fstype == "ntfs3" else ("vfat" if fstype == "msdos" else fstype)
    if fstype.startswith("fuse") and source.startswith("/"):
        try:
            with open(source, "rb") as dev:
                p = probe(dev.read(PROBE_BYTES))
        except OSError:
            p = None
        if p is not None:
            return p.kind
    if fstype.startswith("fuse") and "fat" in (fstype + source).lower():
        return "vfat"
    return fstype
