"""A repository on an SSH server, over SFTP: sftp://[user@]host[:port]/path (sftp://host/~/path: below the
login's home folder).

paramiko does the SSH part (transport, host keys, authentication) the way the OpenSSH client does it with
the user's ~/.ssh/config. The SFTP protocol itself is spoken here, on one channel shared by every thread:
paramiko's SFTPClient must not be used from several threads at once, and it drops the status of pipelined
writes, so a full disk would pass unnoticed. Publishing is what the local store does: write a temporary,
fsync it (fsync@openssh.com), posix-rename@openssh.com it into place, and fsync the folder where the server
allows it. Reads reconnect and retry; a write whose connection drops fails and publishes nothing."""

from __future__ import annotations

import contextlib
import errno
import stat
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from ..errors import CredentialsError, NoSpaceError, RepositoryError
from .base import TEMP_MARK, AtomicWriter, RandomReader, Store, StoreEntry, temporary_name
from .sftp_wire import (
    _ATTR_TIME,
    _ATTRS,
    _FSETSTAT,
    _FSTAT,
    _FX_FAILURE,
    _FX_NO_SUCH_FILE,
    _MKDIR,
    _NO_ATTRS,
    _O_CREAT,
    _O_EXCL,
    _O_READ,
    _O_WRITE,
    _REMOVE,
    _Listing,
    _Lost,
    _Reply,
    _Sftp,
    _Status,
    _str,
)
from .ssh import _Connector, _Host, _parent, parse_url, resolve_host, ssh_timeout

T = TypeVar("T")
ATTEMPTS = 3  # tries of an idempotent operation across reconnections
RETRY_DELAY = 0.5  # seconds before the second try; doubled for each further one (tests shorten it)
WRITE_DEPTH = 64  # write requests in flight per writer
NO_SPACE_LEFT = 1 << 20  # a write failing with less free space than this failed for lack of space
_NO_SPACE_WORDS = ("no space", "quota", "disk full", "insufficient space")

# -- the store ------------------------------------------------------------------------------------------


class _Slot:
    """The store's connection, apart from the store so that a finalizer can close it."""

    def __init__(self) -> None:
        self.conn: _Sftp | None = None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class SftpStore(Store):
    """One SSH connection, made on first use and remade when lost; shared by all threads."""

    remote = True

    def __init__(self, url: str) -> None:
        self._target = parse_url(url)
        self.url = self._target.url
        self._lock, self._count_lock = threading.Lock(), threading.Lock()
        self._slot = _Slot()
        self._host: _Host | None = None
        weakref.finalize(self, self._slot.close)

    # -- connection -------------------------------------------------------------------------------------

    def _connection(self) -> _Sftp:
        """The live connection, made (or remade, when it was lost) now if needed."""
        with self._lock:
            conn = self._slot.conn
            if conn is not None and conn.alive:
                return conn
            self._slot.close()
            if self._host is None:
                self._host = resolve_host(self._target)
            self._slot.conn = conn = _Connector(self.url, self._host).connect(ssh_timeout())
            return conn

    def _drop(self, conn: _Sftp | None) -> None:
        with self._lock:
            if conn is not None and self._slot.conn is conn:
                self._slot.close()

    def close(self) -> None:
        with self._lock:
            self._slot.close()

    def _retry(self, what: str, op: Callable[[_Sftp], T]) -> T:
        """op on a connection, reconnecting and trying again (with growing pauses) when the connection is
        lost: only for operations that may run twice."""
        for attempt in range(ATTEMPTS):
            conn = None
            try:
                conn = self._connection()
                return op(conn)
            except _Lost as e:
                self._drop(conn)
                if attempt + 1 == ATTEMPTS:
                    raise RepositoryError(self._lost_line(what, e)) from e
                time.sleep(RETRY_DELAY * 2**attempt)
        raise AssertionError("unreachable")

    def _once(self, what: str, op: Callable[[_Sftp], T]) -> T:
        """op on a connection, not repeated: a lost connection fails it (only a connection already known
        to be lost is replaced first)."""
        conn = None
        try:
            conn = self._connection()
            return op(conn)
        except _Lost as e:
            self._drop(conn)
            raise RepositoryError(self._lost_line(what, e)) from e

    def _lost_line(self, what: str, e: _Lost) -> str:
        text = str(e)
        return text if text.startswith("cannot connect") else f"cannot {what} on {self.url}: {text}"

    # -- paths and errors -------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        root = self._target.root
        if not name:
            return root or "."
        return f"{root.rstrip('/')}/{name}" if root.startswith("/") else (f"{root}/{name}" if root else name)

    def _fail(self, what: str, name: str, e: _Status, writing: bool = False, conn: _Sftp | None = None) -> Exception:
        """The error to raise for a refused request."""
        line = f"cannot {what} {name} on {self.url}: {e.reason()}"
        if writing and self._no_space(e, conn, name):
            return NoSpaceError(f"{line} (the repository is full)")
        return RepositoryError(line)

    def _no_space(self, e: _Status, conn: _Sftp | None, name: str) -> bool:
        """SFTP has no status for a full disk (OpenSSH says 'Failure'): a server's words, or a filesystem
        found (nearly) full right after, tell it. A full quota (EDQUOT) shows only in the server's words."""
        if any(w in str(e.strerror).lower() for w in _NO_SPACE_WORDS):
            return True
        if e.errno != errno.EIO or conn is None:
            return False
        free = conn.free_bytes(self.path(name.rpartition("/")[0]))
        return free is not None and free < NO_SPACE_LEFT

    def _missing(self, name: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, f"no such file on {self.url}", name)

    # -- folders ----------------------------------------------------------------------------------------

    def root_exists(self) -> bool:
        def op(c: _Sftp) -> bool:
            try:
                mode = c.stat(self.path("")).mode
            except _Status as e:
                if e.errno == errno.ENOENT:
                    return False
                raise RepositoryError(f"cannot look at {self.url}: {e.reason()}") from e
            return mode is None or stat.S_ISDIR(mode)

        return self._retry("look at the repository folder", op)

    def make_root(self) -> None:
        """mkdir -p of the repository folder (imagechain init): nothing else creates it."""

        def op(c: _Sftp) -> None:
            try:
                self._make_dirs(c, self.path(""), stop=None)
            except _Status as e:
                raise RepositoryError(f"cannot create the repository folder {self.url}: {e.reason()}") from e

        self._retry("create the repository folder", op)

    def _make_dirs(self, c: _Sftp, path: str, stop: str | None) -> None:
        """mkdir -p of path, creating nothing at or above stop (the repository's folder: a missing one is
        a repository not found, not one to make up)."""
        missing: list[str] = []
        p = path
        while True:
            try:
                mode = c.stat(p).mode
            except _Status as e:
                if e.errno != errno.ENOENT:
                    raise
            else:
                if mode is not None and not stat.S_ISDIR(mode):
                    raise _Status(_FX_FAILURE, f"{p} is a file, not a folder")
                break
            if p in (stop, ".", "/"):
                raise _Status(_FX_NO_SUCH_FILE, f"repository folder {self.url} not found")
            missing.append(p)
            p = _parent(p)
        for d in reversed(missing):
            try:
                c.send(_MKDIR, _str(d), _NO_ATTRS).status()
            except _Status as e:
                try:
                    mode = c.stat(d).mode  # made at this moment by another writer: fine if a folder
                except _Status:
                    raise e from None
                if mode is not None and not stat.S_ISDIR(mode):
                    raise
        for d in [p, *reversed(missing[1:])] if missing else []:  # each new folder's entry (its writer's fsync
            c.fsync_folder(d)  # makes the entries of the deepest one durable)

    def _parent_dirs(self, c: _Sftp, name: str) -> None:
        folder = name.rpartition("/")[0]
        try:
            self._make_dirs(c, self.path(folder), stop=self.path(""))
        except _Status as e:
            if "repository folder" in str(e.strerror):
                raise RepositoryError(f"cannot write {name}: repository folder {self.url} not found") from e
            raise self._fail("create the folder for", name, e, writing=True, conn=c) from e

    # -- reading ----------------------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[StoreEntry]:
        rel = prefix.strip("/")
        try:
            first = self._retry(f"list {rel or 'the repository'}", self._lister(rel))
        except _Status as e:
            if rel and (e.errno == errno.ENOENT or not self._is_folder(rel)):
                return  # nothing below a folder that does not exist (yet)
            what = "repository folder not found" if e.errno == errno.ENOENT else e.reason()
            raise RepositoryError(f"cannot list {rel or 'the repository'} on {self.url}: {what}") from e
        yield from self._walk(rel, first)

    def _is_folder(self, rel: str) -> bool:
        def op(c: _Sftp) -> bool:
            try:
                mode = c.stat(self.path(rel)).mode
            except _Status:
                return True  # cannot tell: the listing's own error is the one to report
            return mode is None or stat.S_ISDIR(mode)

        return self._retry(f"look at {rel}", op)

    def _lister(self, rel: str) -> Callable[[_Sftp], _Listing]:
        return lambda c: c.listdir(self.path(rel))

    def _walk(self, rel: str, items: _Listing) -> Iterator[StoreEntry]:
        base = rel + "/" if rel else ""
        files = sorted(((n, a) for n, a in items if a.mode is not None and stat.S_ISREG(a.mode)), key=lambda f: f[0])
        dirs = sorted(n for n, a in items if a.mode is not None and stat.S_ISDIR(a.mode) and n not in (".", ".."))
        for n, a in files:
            yield StoreEntry(base + n, a.size or 0, "" if a.mtime is None else str(a.mtime))
        for d in dirs:
            sub = base + d
            try:
                sub_items = self._retry(f"list {sub}", self._lister(sub))
            except _Status as e:
                if e.errno == errno.ENOENT:
                    continue  # removed meanwhile
                raise RepositoryError(f"cannot list {sub} on {self.url}: {e.reason()}") from e
            yield from self._walk(sub, sub_items)

    def open(self, name: str) -> RandomReader:
        return _SftpReader(self, name)

    def read(self, name: str, offset: int, length: int) -> bytes:
        def op(c: _Sftp) -> bytes:
            handle = c.open(self.path(name), _O_READ)
            try:
                return c.read(handle, offset, length) if length > 0 else b""
            finally:
                c.close_handle(handle, wait=False)

        try:
            return self.counted(self._retry(f"read {name}", op))
        except _Status as e:
            raise self._missing(name) if e.errno == errno.ENOENT else self._fail("read", name, e) from e

    def counted(self, data: bytes) -> bytes:
        with self._count_lock:
            self.bytes_read += len(data)
        return data

    def size(self, name: str) -> int:
        try:
            return self._retry(f"read the size of {name}", lambda c: c.stat(self.path(name)).size or 0)
        except _Status as e:
            raise self._missing(name) if e.errno == errno.ENOENT else self._fail("look at", name, e) from e

    def exists(self, name: str) -> bool:
        def op(c: _Sftp) -> bool:
            try:
                c.stat(self.path(name))
            except _Status as e:
                if e.errno == errno.ENOENT:
                    return False
                raise self._fail("look at", name, e) from e
            return True

        return self._retry(f"look at {name}", op)

    # -- writing ----------------------------------------------------------------------------------------

    def create(self, name: str) -> AtomicWriter:
        return _SftpWriter(self, name)

    def delete(self, name: str) -> None:
        def op(c: _Sftp) -> None:
            try:
                c.send(_REMOVE, _str(self.path(name))).status()
            except _Status as e:
                if e.errno != errno.ENOENT:
                    raise self._fail("delete", name, e) from e

        self._retry(f"delete {name}", op)

    def rename(self, name: str, new_name: str) -> None:
        src, dst = self.path(name), self.path(new_name)

        def op(c: _Sftp) -> None:
            try:
                handle = c.open(src, _O_READ)  # its content first: it may have been written by a process that died
                try:
                    c.fsync(handle)
                finally:
                    c.close_handle(handle, wait=False)
            except _Status as e:
                raise self._fail("publish", name, e) from e
            self._parent_dirs(c, new_name)
            try:
                c.posix_rename(src, dst)
            except _Status as e:
                raise RepositoryError(f"cannot rename {name} to {new_name} on {self.url}: {e.reason()}") from e
            c.fsync_folder(_parent(dst))

        self._once(f"rename {name}", op)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Written whole under a temporary name, then hard-linked to name (hardlink@openssh.com: atomic,
        refused when the name exists, so only one of any number of racing machines wins). Servers without
        hard links get an exclusive create (O_EXCL) and a write, which a killed writer can cut short."""
        try:
            return self._once(f"create {name}", lambda c: self._create_exclusive(c, name, data))
        except _Status as e:
            raise self._fail("create", name, e, writing=True) from e

    def _create_exclusive(self, c: _Sftp, name: str, data: bytes) -> bool:
        self._parent_dirs(c, name)
        path = self.path(name)
        tmp = temporary_name(path)
        try:
            self._write_new(c, tmp, data, name)
            try:
                c.extended("hardlink@openssh.com", _str(tmp), _str(path)).status()
            except _Status:
                if self._exists(c, path) or not self._exists(c, tmp):  # taken; or the winner removed ours
                    return False
                return self._create_direct(c, path, data, name)  # no hard links there
        finally:
            with contextlib.suppress(_Status):
                c.send(_REMOVE, _str(tmp)).status()
        self._clear_temporaries(c, path)
        c.fsync_folder(_parent(path))
        return True

    def _clear_temporaries(self, c: _Sftp, path: str) -> None:
        """Ours now: temporaries of the same name are of writers killed before their link, or losing now."""
        folder, _, base = path.rpartition("/")
        with contextlib.suppress(_Status):
            for other, _a in c.listdir(folder or "."):
                if other.startswith(base + TEMP_MARK):
                    with contextlib.suppress(_Status):
                        c.send(_REMOVE, _str(f"{folder}/{other}" if folder else other)).status()

    @staticmethod
    def _exists(c: _Sftp, path: str) -> bool:
        try:
            c.stat(path)
        except _Status as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def _write_new(self, c: _Sftp, path: str, data: bytes, name: str) -> None:
        try:
            handle = c.open(path, _O_WRITE | _O_CREAT | _O_EXCL)
        except _Status as e:
            raise self._fail("create", name, e, writing=True, conn=c) from e
        try:
            replies = [c.write(handle, off, data[off : off + c.max_write]) for off in range(0, len(data), c.max_write)]
            for r in replies:
                r.status()
            c.fsync(handle)
            c.close_handle(handle)
        except _Status as e:
            c.close_handle(handle, wait=False)
            with contextlib.suppress(_Status):
                c.send(_REMOVE, _str(path)).status()
            raise self._fail("write", name, e, writing=True, conn=c) from e

    def _create_direct(self, c: _Sftp, path: str, data: bytes, name: str) -> bool:
        try:
            self._write_new(c, path, data, name)
        except (NoSpaceError, RepositoryError):
            if self._exists(c, path):
                return False
            raise
        c.fsync_folder(_parent(path))
        return True

    def patch(self, name: str, offset: int, data: bytes) -> None:
        """Written in place and fsynced; the mtime (the catalog cache's tag for this file) is made to change
        even within the second it was last written in, since SFTP times have whole seconds only."""

        def op(c: _Sftp) -> None:
            path = self.path(name)
            try:
                before = c.stat(path).mtime
                handle = c.open(path, _O_WRITE)
            except _Status as e:
                raise self._fail("change", name, e, writing=True, conn=c) from e
            try:
                replies = [c.write(handle, offset + o, data[o : o + c.max_write])
                           for o in range(0, len(data), c.max_write)]  # fmt: skip
                for r in replies:
                    r.status()
                c.fsync(handle)
                after = c.send(_FSTAT, _str(handle)).expect(_ATTRS).attrs().mtime
                if before is not None and after is not None and after <= before:
                    c.send(_FSETSTAT, _str(handle), struct.pack(">III", _ATTR_TIME, before + 1, before + 1)).status()
            except _Status as e:
                raise self._fail("change", name, e, writing=True, conn=c) from e
            finally:
                c.close_handle(handle, wait=False)

        self._once(f"change {name}", op)

    def filesystem(self) -> str:
        return ""  # no size limit worth splitting for: servers store on POSIX filesystems


class _SftpReader(RandomReader):
    """A file open on the server; reopened on a new connection when the old one is lost."""

    def __init__(self, store: SftpStore, name: str) -> None:
        self._store, self._name, self._path = store, name, store.path(name)
        self._lock = threading.Lock()
        self._conn: _Sftp | None = None
        self._handle = b""
        try:
            store._retry(f"open {name}", self._handle_on)
        except _Status as e:
            raise store._missing(name) if e.errno == errno.ENOENT else store._fail("open", name, e) from e

    def _handle_on(self, conn: _Sftp) -> bytes:
        with self._lock:
            if self._conn is not conn:
                self._handle = conn.open(self._path, _O_READ)
                self._conn = conn
            return self._handle

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            data = self._store._retry(f"read {self._name}", lambda c: c.read(self._handle_on(c), offset, length))
        except _Status as e:
            raise self._store._missing(self._name) if e.errno == errno.ENOENT else self._store._fail(
                "read", self._name, e) from e  # fmt: skip
        return self._store.counted(data)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and conn.alive:
            with contextlib.suppress(_Lost):
                conn.close_handle(self._handle, wait=False)


class _SftpWriter(AtomicWriter):
    """Writes go out in the server's largest requests, many in flight, each reply checked (a full disk
    fails the next write, flush or commit). Bound to the connection it started on: if that is lost the
    writer fails, and its temporary is never renamed on another connection."""

    def __init__(self, store: SftpStore, name: str) -> None:
        self.name = name
        self._store = store
        self._final = store.path(name)
        self._tmp = temporary_name(self._final)
        self._buf = bytearray()
        self._flight: deque[_Reply] = deque()
        self._pos = self._sent = 0
        self._handle: bytes | None = None
        self._failed: Exception | None = None
        self._conn = store._retry(f"write {name}", self._start)  # nothing written yet: may run twice
        self._chunk = self._conn.max_write

    def _start(self, c: _Sftp) -> _Sftp:
        self._store._parent_dirs(c, self.name)
        try:
            self._handle = c.open(self._tmp, _O_READ | _O_WRITE | _O_CREAT | _O_EXCL)
        except _Status as e:
            raise self._store._fail("write", self.name, e, writing=True, conn=c) from e
        return c

    def _guard(self, what: str, op: Callable[[], T]) -> T:
        """op, its failures turned into the repository's; after one, the writer refuses everything."""
        if self._failed is not None:  # the same error again, for each later call
            raise type(self._failed)(str(self._failed))
        try:
            return op()
        except _Lost as e:
            self._store._drop(self._conn)
            self._failed = RepositoryError(f"cannot {what} {self.name} on {self._store.url}: {e}; nothing was "
                                           f"published")  # fmt: skip
        except _Status as e:
            self._failed = self._store._fail(what, self.name, e, writing=True, conn=self._conn)
        raise self._failed

    def write(self, data: bytes | memoryview) -> int:
        return self._guard("write", lambda: self._write(memoryview(data).cast("B")))

    def _write(self, view: memoryview) -> int:
        n = len(view)
        if self._buf:
            take = min(n, self._chunk - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._chunk:
                self._send(bytes(self._buf))
                self._buf.clear()
        while len(view) >= self._chunk:
            self._send(view[: self._chunk])
            view = view[self._chunk :]
        self._buf += view
        self._pos += n
        return n

    def _send(self, data: bytes | memoryview) -> None:
        assert self._handle is not None
        self._flight.append(self._conn.write(self._handle, self._sent, data))
        self._sent += len(data)
        while len(self._flight) > WRITE_DEPTH:
            self._flight.popleft().status()

    def _drain(self) -> None:
        if self._buf:
            self._send(bytes(self._buf))
            self._buf.clear()
        while self._flight:
            self._flight.popleft().status()

    def tell(self) -> int:
        return self._pos

    def read_back(self, offset: int, length: int) -> bytes | None:
        def op() -> bytes:
            self._drain()
            assert self._handle is not None
            return self._conn.read(self._handle, offset, length)

        return self._guard("read back", op)

    def flush(self) -> None:
        def op() -> None:
            self._drain()
            assert self._handle is not None
            self._conn.fsync(self._handle)

        self._guard("write", op)

    def commit(self) -> None:
        def op() -> None:
            self._drain()
            assert self._handle is not None
            self._conn.fsync(self._handle)
            handle, self._handle = self._handle, None
            self._conn.close_handle(handle)
            self._conn.posix_rename(self._tmp, self._final)
            self._conn.fsync_folder(_parent(self._final))

        self._guard("publish", op)

    def abort(self) -> None:
        """Close and remove the temporary; quietly, as it runs while another error is reported."""
        conn = self._conn if self._conn.alive else None
        handle, self._handle = self._handle, None
        self._buf.clear()
        self._flight.clear()
        try:
            if conn is None:
                conn = self._store._connection()  # the temporary is on the server all the same
            elif handle is not None:
                conn.close_handle(handle, wait=False)
            conn.send(_REMOVE, _str(self._tmp)).status()
        except (_Lost, _Status, RepositoryError, CredentialsError):
            pass
