"""The SFTP protocol (version 3, draft-ietf-secsh-filexfer-02, and the OpenSSH extensions fsync,
posix-rename, hardlink and statvfs) on one SSH channel shared by every thread: each request carries an id,
one reader thread hands each reply to the thread waiting for it, so many requests are in flight at once.

Spoken here rather than through paramiko's SFTPClient, which must not be used from several threads at
once, keeps 32 KiB requests, and drops the status of pipelined writes (a full disk would pass unnoticed)."""

from __future__ import annotations

import contextlib
import errno
import struct
import threading
from collections import deque
from dataclasses import dataclass

import paramiko

REPLY_TIMEOUT = 600.0  # a server silent this long is taken for gone (TCP keepalive usually tells sooner)
READ_DEPTH = 64  # read requests in flight per pread
DEFAULT_IO = 32 << 10  # request size for servers that do not tell their limits (safe everywhere)
MAX_IO = 255 << 10  # OpenSSH's own limit (256 KiB messages)
MAX_MESSAGE = 1 << 20  # a longer SFTP message is garbage: the stream is out of step


# SFTP version 3 (draft-ietf-secsh-filexfer-02) and the OpenSSH extensions used here
_INIT, _VERSION, _OPEN, _CLOSE, _READ, _WRITE, _FSTAT, _FSETSTAT = 1, 2, 3, 4, 5, 6, 8, 10
_OPENDIR, _READDIR, _REMOVE, _MKDIR, _STAT, _RENAME = 11, 12, 13, 14, 17, 18
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS, _EXTENDED, _EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
_FX_OK, _FX_EOF, _FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED, _FX_FAILURE, _FX_OP_UNSUPPORTED = 0, 1, 2, 3, 4, 8
_O_READ, _O_WRITE, _O_CREAT, _O_EXCL = 0x01, 0x02, 0x08, 0x20
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERM, _ATTR_TIME, _ATTR_EXT = 0x1, 0x2, 0x4, 0x8, 0x80000000
_FILE_MODE = struct.pack(">II", _ATTR_PERM, 0o644)
_NO_ATTRS = struct.pack(">I", 0)
_ERRNO = {_FX_NO_SUCH_FILE: errno.ENOENT, _FX_PERMISSION_DENIED: errno.EACCES, _FX_OP_UNSUPPORTED: errno.EOPNOTSUPP}


class _Lost(Exception):
    """The connection is gone (or never came up for a reason that may pass): worth a reconnection."""


class _Status(OSError):
    """An SFTP status other than OK; errno is what its code tells (EIO for the generic 'Failure')."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(_ERRNO.get(code, errno.EIO), text or "failure")
        self.code = code

    def reason(self) -> str:
        return {errno.ENOENT: "not found", errno.EACCES: "permission denied"}.get(self.errno or 0, str(self.strerror))


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return _u32(len(b)) + b


@dataclass
class _Attrs:
    size: int | None = None
    mode: int | None = None
    mtime: int | None = None


_Listing = list[tuple[str, _Attrs]]


class _Cursor:
    """Reads the fields of one reply; a malformed reply raises _Lost (the stream cannot be trusted)."""

    def __init__(self, body: memoryview) -> None:
        self._b, self._at = body, 0

    def _take(self, n: int) -> memoryview:
        if self._at + n > len(self._b):
            raise _Lost("the server sent a malformed SFTP reply")
        part = self._b[self._at : self._at + n]
        self._at += n
        return part

    def left(self) -> int:
        return len(self._b) - self._at

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def raw(self) -> memoryview:
        return self._take(self.u32())

    def text(self) -> str:
        return bytes(self.raw()).decode("utf-8", "replace")

    def attrs(self) -> _Attrs:
        flags, a = self.u32(), _Attrs()
        if flags & _ATTR_SIZE:
            a.size = self.u64()
        if flags & _ATTR_UIDGID:
            self._take(8)
        if flags & _ATTR_PERM:
            a.mode = self.u32()
        if flags & _ATTR_TIME:
            self.u32()
            a.mtime = self.u32()
        if flags & _ATTR_EXT:
            for _ in range(self.u32()):
                self.raw(), self.raw()
        return a


class _Reply:
    """The answer to one request, filled in by the connection's reader thread."""

    __slots__ = ("_done", "body", "kind", "lost")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.kind, self.body, self.lost = 0, memoryview(b""), ""

    def set(self, kind: int, body: memoryview) -> None:
        self.kind, self.body = kind, body
        self._done.set()

    def fail(self, why: str) -> None:
        self.lost = why
        self._done.set()

    def wait(self) -> tuple[int, _Cursor]:
        if not self._done.wait(REPLY_TIMEOUT):
            raise _Lost(f"the server did not answer for {REPLY_TIMEOUT:.0f} s")
        if self.lost:
            raise _Lost(self.lost)
        return self.kind, _Cursor(self.body)

    def status(self) -> None:
        """Wait for a plain status reply; raise unless it is OK."""
        kind, cur = self.wait()
        _check_status(kind, cur, _STATUS)

    def expect(self, want: int) -> _Cursor:
        kind, cur = self.wait()
        _check_status(kind, cur, want)
        return cur


def _check_status(kind: int, cur: _Cursor, want: int) -> None:
    """Raise for an error status, or for a reply of the wrong type."""
    if kind == _STATUS:
        code, text = cur.u32(), cur.text()
        if code != _FX_OK:
            raise _Status(code, text)
    if kind != want:
        raise _Lost(f"the server sent SFTP reply type {kind} where {want} was due")


class _Sftp:
    """One SSH connection with one SFTP channel. Requests from any thread are tagged with ids; a reader
    thread hands each reply to the request waiting for it, so threads pipeline their requests on one
    channel instead of taking turns."""

    def __init__(self, transport: paramiko.Transport, chan: paramiko.Channel, timeout: float) -> None:
        self.transport, self._chan = transport, chan
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._pending: dict[int, _Reply] = {}
        self._next_id = 1
        self.lost = ""
        chan.settimeout(timeout)
        self.extensions = self._handshake()
        chan.settimeout(None)  # from here on, silence is an idle connection (keepalives watch it)
        self.max_read = self.max_write = DEFAULT_IO
        threading.Thread(target=self._read_replies, name="sftp-replies", daemon=True).start()
        if "limits@openssh.com" in self.extensions:
            self._read_limits()

    # -- the wire --------------------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            b = self._chan.recv(left)
            if not b:
                raise EOFError("the server closed the connection")
            parts.append(b)
            left -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _recv_packet(self) -> bytes:
        (n,) = struct.unpack(">I", self._recv(4))
        if not 5 <= n <= MAX_MESSAGE:
            raise _Lost(f"the server sent an SFTP packet of {n} bytes")
        return self._recv(n)

    def _handshake(self) -> dict[str, bytes]:
        self._chan.sendall(struct.pack(">IBI", 5, _INIT, 3))
        body = memoryview(self._recv_packet())
        if body[0] != _VERSION:
            raise _Lost("the server does not speak SFTP")
        cur = _Cursor(body[1:])
        cur.u32()
        ext: dict[str, bytes] = {}
        while cur.left():  # (name, data) pairs to the end of the packet
            name = cur.text()
            ext[name] = bytes(cur.raw())
        return ext

    def _read_limits(self) -> None:
        cur = self.send(_EXTENDED, _str("limits@openssh.com")).expect(_EXTENDED_REPLY)
        cur.u64()
        rd, wr = cur.u64(), cur.u64()
        self.max_read = min(rd or MAX_IO, MAX_IO)
        self.max_write = min(wr or MAX_IO, MAX_IO)

    def _read_replies(self) -> None:
        try:
            while True:
                body = memoryview(self._recv_packet())
                if len(body) < 5:
                    raise _Lost("the server sent a truncated SFTP reply")
                (rid,) = struct.unpack(">I", body[1:5])
                with self._lock:
                    reply = self._pending.pop(rid, None)
                if reply is not None:
                    reply.set(body[0], body[5:])
        except Exception as e:  # the channel is unusable from here on, whatever broke it
            self._die(_why(e))

    def _die(self, why: str) -> None:
        with self._lock:
            self.lost = self.lost or why
            pending, self._pending = self._pending, {}
        for r in pending.values():
            r.fail(self.lost)
        with contextlib.suppress(Exception):
            self._chan.close()

    @property
    def alive(self) -> bool:
        return not self.lost and self.transport.is_active()

    def send(self, kind: int, *fields: bytes | memoryview) -> _Reply:
        reply = _Reply()
        with self._lock:
            if self.lost:
                raise _Lost(self.lost)
            rid, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFFFFFF
            self._pending[rid] = reply
        size = 5 + sum(len(f) for f in fields)
        packet = b"".join((struct.pack(">IBI", size, kind, rid), *fields))
        try:
            with self._send_lock:
                self._chan.sendall(packet)
        except Exception as e:
            self._die(_why(e))
            raise _Lost(self.lost) from e
        return reply

    def close(self) -> None:
        self._die("the connection was closed")
        with contextlib.suppress(Exception):
            self.transport.close()

    # -- requests ---------------------------------------------------------------------------------------

    def stat(self, path: str) -> _Attrs:
        return self.send(_STAT, _str(path)).expect(_ATTRS).attrs()

    def open(self, path: str, flags: int) -> bytes:
        attrs = _FILE_MODE if flags & _O_CREAT else _NO_ATTRS
        return bytes(self.send(_OPEN, _str(path), _u32(flags), attrs).expect(_HANDLE).raw())

    def close_handle(self, handle: bytes, wait: bool = True) -> None:
        reply = self.send(_CLOSE, _str(handle))
        if wait:
            reply.status()

    def write(self, handle: bytes, offset: int, data: bytes | memoryview) -> _Reply:
        return self.send(_WRITE, _str(handle), _u64(offset), _u32(len(data)), data)

    def read(self, handle: bytes, offset: int, length: int) -> bytes:
        """Up to length bytes at offset: requests of the server's largest size, many in flight."""
        pieces: list[bytes] = []
        pos, end, ask = offset, offset + length, offset
        flight: deque[tuple[int, _Reply]] = deque()
        while True:
            while ask < end and len(flight) < READ_DEPTH:
                n = min(self.max_read, end - ask)
                flight.append((n, self.send(_READ, _str(handle), _u64(ask), _u32(n))))
                ask += n
            if not flight:
                break
            n, reply = flight.popleft()
            data = self._data(reply)
            if not data:
                break  # end of file
            pieces.append(data)
            pos += len(data)
            if len(data) < n:  # a short read, at the end of the file or at a server's limit: go on from here
                flight.clear()  # their replies are dropped as they come
                ask = pos
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @staticmethod
    def _data(reply: _Reply) -> bytes:
        kind, cur = reply.wait()
        if kind == _STATUS:
            code, text = cur.u32(), cur.text()
            if code == _FX_EOF:
                return b""
            raise _Status(code, text)
        if kind != _DATA:
            raise _Lost(f"the server sent SFTP reply type {kind} where data was due")
        return bytes(cur.raw())

    def listdir(self, path: str) -> _Listing:
        handle = bytes(self.send(_OPENDIR, _str(path)).expect(_HANDLE).raw())
        out: _Listing = []
        try:
            while True:
                kind, cur = self.send(_READDIR, _str(handle)).wait()
                if kind == _STATUS:
                    code, text = cur.u32(), cur.text()
                    if code == _FX_EOF:
                        return out
                    raise _Status(code, text)
                _check_status(kind, cur, _NAME)
                for _ in range(cur.u32()):
                    name = cur.text()
                    cur.raw()  # the ls -l line
                    out.append((name, cur.attrs()))
        finally:
            self.close_handle(handle, wait=False)

    def extended(self, name: str, *fields: bytes) -> _Reply:
        if name not in self.extensions:
            raise _Status(_FX_OP_UNSUPPORTED, f"the server has no {name}")
        return self.send(_EXTENDED, _str(name), *fields)

    def fsync(self, handle: bytes) -> None:
        """Durable on the server's disk; a server without fsync@openssh.com only gets the file closed."""
        if "fsync@openssh.com" in self.extensions:
            self.extended("fsync@openssh.com", _str(handle)).status()

    def fsync_folder(self, path: str) -> None:
        """Best effort: OpenSSH's server opens a folder for reading and fsyncs it like a file (making a
        rename in it durable); other servers refuse, and the rename is as durable as they make it."""
        if "fsync@openssh.com" not in self.extensions:
            return
        try:
            handle = self.open(path, _O_READ)
        except _Status:
            return
        try:
            self.fsync(handle)
        except _Status:
            pass
        finally:
            self.close_handle(handle, wait=False)

    def posix_rename(self, src: str, dst: str) -> None:
        """Atomic replacement of dst. Without posix-rename@openssh.com: the SFTP rename, which refuses
        an existing dst, so dst is removed first (not atomic, but such servers offer nothing better)."""
        if "posix-rename@openssh.com" in self.extensions:
            self.extended("posix-rename@openssh.com", _str(src), _str(dst)).status()
            return
        try:
            self.send(_RENAME, _str(src), _str(dst)).status()
        except _Status:
            with contextlib.suppress(_Status):
                self.send(_REMOVE, _str(dst)).status()
            self.send(_RENAME, _str(src), _str(dst)).status()

    def free_bytes(self, path: str) -> int | None:
        """Space left to us on the filesystem holding path (statvfs@openssh.com); None if unknown."""
        try:
            cur = self.extended("statvfs@openssh.com", _str(path)).expect(_EXTENDED_REPLY)
            _bsize, frsize, _blocks, _bfree, bavail = (cur.u64() for _ in range(5))
        except (_Status, _Lost):
            return None
        return frsize * bavail


def _why(e: BaseException) -> str:
    """A connection failure as a phrase for an error line."""
    if isinstance(e, _Lost):
        return str(e)
    if isinstance(e, EOFError | paramiko.SSHException) and "closed" not in str(e).lower():
        return f"the connection was lost ({e})" if str(e) else "the connection was lost"
    if isinstance(e, OSError):
        return f"the connection was lost ({e.strerror or e})"
    return str(e) or "the connection was lost"


