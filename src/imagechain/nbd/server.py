"""An NBD server over a point view, read-only or writable through a copy-on-write overlay (docs/NBD.md).

Written from the protocol's specification (doc/proto.md of github.com/NetworkBlockDevice/nbd): fixed
newstyle handshake, NBD_OPT_GO/INFO, structured replies and the base:allocation metadata context, so that
qemu-img, qemu-io, nbdinfo, nbdcopy and QEMU itself can read any point of a chain without restoring it.

One thread per connection, answering its requests in order: a client streaming the volume then reads
sequentially, which is what the view's read-ahead recognises (answering a connection's requests side by
side was measured slower on 2 cores: Python threads contend, and the stream is no longer recognised).
Clients that want parallelism open several connections (CAN_MULTI_CONN: the view, and the overlay, are
shared by all of them, so what one connection wrote is what every other reads). A read that touches a
block failing its proof is answered EIO for that request only, and logged; the connection and every other
read go on."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

from ..errors import ImagechainError, MountError, UsageError
from ..format import spec
from ..interrupts import join_started
from ..view import Extent

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 10809
MAX_REQUEST = 32 << 20  # largest read or write payload, advertised as the maximum block size
MAX_OPTION = 1 << 16  # option data beyond this is not a client we want to talk to
MAX_CONNECTIONS = 128
HANDSHAKE_TIMEOUT = 60.0
STATUS_SPAN_BLOCKS = 256  # block status: blocks looked at first (the span doubles until enough is known)
STATUS_EXTENTS = 64  # block status: extents that are enough for one reply

# handshake (proto.md, "Newstyle negotiation")
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1 << 0, 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3
REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN = (1 << 31) + 6, (1 << 31) + 7

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# transmission flags
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN, TF_SEND_CACHE = 1 << 5, 1 << 6, 1 << 8, 1 << 10

# transmission
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_BLOCK_STATUS = 0, 1, 2, 5
REPLY_TYPE_ERROR = (1 << 15) + 1
EPERM, EIO, EINVAL, ENOSPC, ESHUTDOWN = 1, 5, 22, 28, 108

BASE_ALLOCATION = "base:allocation"
ALLOCATION_ID = 1
STATE_HOLE, STATE_ZERO = 1 << 0, 1 << 1
STATE_OF = {spec.BLOCK_DATA: 0, spec.BLOCK_ZERO: STATE_ZERO, spec.BLOCK_UNUSED: STATE_HOLE | STATE_ZERO}

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")


class Disk(Protocol):
    """What is served: a PointView, or an Overlay in front of one."""

    size: int
    block_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...


class Writable(Disk, Protocol):
    """A disk that takes writes (the overlay); the repository itself never does."""

    def write(self, offset: int, data: bytes | bytearray) -> None: ...

    def zero(self, offset: int, length: int, punch: bool = True) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


class Closable(Protocol):
    def close(self) -> None: ...


class _Closed(Exception):
    """The peer went away, or broke the protocol: end the connection without a reply."""


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6ADDR]:PORT, HOST or :PORT (defaults 127.0.0.1 and 10809); port 0 picks a free one."""
    t = text.strip()
    host, port = t, ""
    if t.startswith("["):
        inside, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad --listen {text!r}: use HOST:PORT or [IPV6]:PORT")
        host, port = inside, rest[1:]
    elif t.count(":") == 1:
        host, port = t.split(":")
    elif t.count(":") > 1:
        raise UsageError(f"bad --listen {text!r}: write an IPv6 address in brackets, [::1]:10809")
    elif t.isdigit():
        host, port = "", t
    if port and not port.isdigit():
        raise UsageError(f"bad --listen {text!r}: the port must be a number")
    number = int(port) if port else DEFAULT_PORT
    if not 0 <= number <= 65535:
        raise UsageError(f"bad --listen {text!r}: the port must be 0..65535")
    return host or DEFAULT_HOST, number


def close_view(view: Closable) -> None:
    """Close what is served (read-ahead still queued is cancelled; readers waiting on it get an error)."""
    view.close()


def _bind(s: socket.socket, addr: tuple[Any, ...] | str, where: str) -> None:
    """Bind and listen, or close the socket and say why in one line."""
    try:
        s.bind(addr)
        s.listen(64)
    except OSError as e:
        s.close()
        why = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise MountError(f"cannot listen on {where}: {why}") from e


def _stderr_log(message: str) -> None:
    sys.stderr.write(f"imagechain: {message}\n")
    sys.stderr.flush()


class NbdServer:
    """Serves one export (`name`, default the empty name every client asks for by default) of `disk`.
    Listen with listen_tcp or listen_unix, then serve_forever (in the calling thread; a stop signal ends
    it) or start_background; stop() closes the listener and every connection. Without an overlay the
    export is read-only and says so (NBD_FLAG_READ_ONLY); writes, trims and zeroing answer EPERM."""

    def __init__(self, disk: Disk, *, overlay: Writable | None = None, name: str = "", description: str = "",
                 log: Callable[[str], None] | None = None) -> None:  # fmt: skip
        if len(name.encode()) > 4096 or "\0" in name:
            raise UsageError("the export name must be at most 4096 bytes, without NUL")
        self.disk: Disk = overlay if overlay is not None else disk
        self.overlay = overlay
        self.name, self.description = name, description
        self.log = log or _stderr_log
        self.size = disk.size
        self.preferred = max(512, min(disk.block_size, MAX_REQUEST))
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_CACHE
        if overlay is None:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        self.flags = flags
        self.uri = ""
        self.address: tuple[str, int] | None = None  # TCP: the host and port bound
        self._listener: socket.socket | None = None
        self._unix_path: str | None = None
        self._private_dir: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._thread: threading.Thread | None = None
        self._serving = False

    # -- listening

    def listen_tcp(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
        """Bind host:port (port 0: any free port); returns the NBD URI clients connect to."""
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]  # fmt: skip
        except socket.gaierror as e:
            raise UsageError(f"cannot listen on {where}: {e.strerror}") from e
        s = socket.socket(family, kind, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        _bind(s, addr, where)
        bound = s.getsockname()
        self._listener = s
        self.address = (str(bound[0]), int(bound[1]))
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        self.uri = f"nbd://{shown}:{bound[1]}" + (f"/{quote(self.name, safe='')}" if self.name else "")
        return self.uri

    def listen_unix(self, path: str) -> str:
        """Bind a Unix socket at path (a stale socket nobody listens on is replaced); returns the URI."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise MountError(f"cannot listen on {path}: it exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise MountError(f"cannot listen on {path}: address in use (another server listens there)")
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # left by a server that died
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind(s, path, path)
        self._listener, self._unix_path = s, path
        self.uri = f"nbd+unix:///{quote(self.name, safe='')}?socket={quote(os.path.abspath(path), safe='/')}"
        return self.uri

    # -- serving

    def serve_forever(self) -> None:
        """Accept connections until stop(); a stop signal in the main thread ends it by its exception."""
        listener = self._listener
        if listener is None:
            raise MountError("the NBD server is not listening")
        with self._lock:
            if self._wake_r < 0:
                return
            self._serving = True
        try:
            self._accept_loop(listener)
        finally:
            with self._lock:
                self._serving = False
            if self._stopping.is_set():
                self._close_wake()

    def _accept_loop(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self._stopping.is_set():
                        return
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError, InterruptedError):
                        continue
                    except OSError as e:
                        if self._stopping.is_set():
                            return
                        self.log(f"serve: cannot accept a connection: {e.strerror or e}")
                        self._stopping.wait(0.2)  # out of file descriptors: let connections end
                        continue
                    self._start(conn)

    def start_background(self) -> str:
        """Serve from a background thread (on a private Unix socket unless listening already); returns the
        URI. For exports and tests."""
        if self._listener is None:
            self._private_dir = tempfile.mkdtemp(prefix="imagechain-nbd-")
            self.listen_unix(os.path.join(self._private_dir, "nbd.sock"))
        self._thread = threading.Thread(target=self.serve_forever, name="nbd-accept", daemon=True)
        self._thread.start()
        return self.uri

    def serve_tcp(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.listen_tcp(host, port)
        self.serve_forever()

    def serve_unix(self, path: str) -> None:
        self.listen_unix(path)
        self.serve_forever()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _start(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                conn.close()
                self.log(f"serve: a connection was refused: {MAX_CONNECTIONS} are open already")
                return
            t = threading.Thread(target=self._run, args=(conn,), name="nbd-conn", daemon=True)
            self._conns[conn] = t
        t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(self, conn).run()
        except (_Closed, OSError):
            pass  # the client went away or broke the protocol: nothing to answer
        except Exception as e:  # a bug must end one connection, not the server
            self.log(f"serve: connection ended by an internal error: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def stop(self) -> None:
        """Stop accepting, end every connection (a request being answered finishes first), remove the
        socket file. The disk is the caller's to close."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            join_started(self._thread, 5)
        with self._lock:
            conns = list(self._conns.items())
        for conn, _t in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _conn, t in conns:
            t.join(10)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None
        if self._private_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._private_dir)
            self._private_dir = None
        with self._lock:
            serving = self._serving
        if not serving:  # else the loop, woken, closes them itself
            self._close_wake()

    def _close_wake(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Connection:
    """One client: the handshake, then its requests in order."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.structured = False
        self.no_zeroes = False
        self.contexts: dict[int, str] = {}

    # -- wire

    def _recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise _Closed()
            got += k
        return buf

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        bufs = [memoryview(p) for p in parts if len(p)]
        while bufs:
            n = self.sock.sendmsg(bufs[:512])
            while n:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0

    def _reply(self, opt: int, kind: int, data: bytes = b"") -> None:
        self._send(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, kind, len(data)), data)

    # -- handshake

    def run(self) -> None:
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        if self._handshake():
            self.sock.settimeout(None)
            self._transmission()

    def _handshake(self) -> bool:
        """Option haggling; True when the client entered transmission, False when it aborted."""
        srv = self.server
        self._send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self._recv(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Closed()  # the spec requires dropping a client with unknown flags
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = OPTION.unpack(self._recv(OPTION.size))
            if magic != IHAVEOPT or length > MAX_OPTION:
                raise _Closed()
            data = bytes(self._recv(length))
            if srv._stopping.is_set() and opt != OPT_ABORT:
                self._reply(opt, REP_ERR_SHUTDOWN, b"the server is shutting down")
                continue
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != srv.name:
                    raise _Closed()  # this option cannot answer an error: the spec says to hang up
                self._send(struct.pack(">QH", srv.size, srv.flags), b"" if self.no_zeroes else bytes(124))
                return True
            if opt == OPT_ABORT:
                with contextlib.suppress(OSError):
                    self._reply(opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                if data:
                    self._reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                name = srv.name.encode()
                self._reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name + srv.description.encode())
                self._reply(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(opt, data) and opt == OPT_GO:
                    return True
            elif opt == OPT_STRUCTURED_REPLY:
                if data:
                    self._reply(opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                self.structured = True
                self._reply(opt, REP_ACK)
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self._meta(opt, data)
            else:  # STARTTLS included: this server has no TLS (docs/NBD.md: use a Unix socket or SSH)
                self._reply(opt, REP_ERR_UNSUP, b"option not supported by the imagechain NBD server")

    def _info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO: the export's size, flags and block sizes; True when accepted."""
        srv = self.server
        if len(data) < 6:
            self._reply(opt, REP_ERR_INVALID, b"option data too short")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._reply(opt, REP_ERR_INVALID, b"export name length past the option's end")
            return False
        name = data[4 : 4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._reply(opt, REP_ERR_INVALID, b"information request list does not match the option length")
            return False
        requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        if name.decode("utf-8", "replace") != srv.name:
            self._reply(opt, REP_ERR_UNKNOWN, f"no export named {name.decode('utf-8', 'replace')!r} "
                                              f"(this server has {srv.name!r})".encode())  # fmt: skip
            return False
        self._reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, srv.size, srv.flags))
        # sent unasked too: a client that did not ask ignores it, one that did must honour it
        self._reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, srv.preferred, MAX_REQUEST))
        if INFO_NAME in requests:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + srv.name.encode())
        if INFO_DESCRIPTION in requests and srv.description:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + srv.description.encode())
        self._reply(opt, REP_ACK)
        return True

    def _meta(self, opt: int, data: bytes) -> None:
        """LIST/SET_META_CONTEXT: the one context this server knows is base:allocation."""
        if opt == OPT_SET_META_CONTEXT:
            self.contexts = {}  # replaced even when the option fails
        if not self.structured:
            self._reply(opt, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            name, queries = _parse_meta(data)
        except ValueError as e:
            self._reply(opt, REP_ERR_INVALID, str(e).encode())
            return
        if name != self.server.name:
            self._reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if opt == OPT_LIST_META_CONTEXT:
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(opt, REP_META_CONTEXT, struct.pack(">I", 0) + BASE_ALLOCATION.encode())
        elif BASE_ALLOCATION in queries:
            self.contexts = {ALLOCATION_ID: BASE_ALLOCATION}
            self._reply(opt, REP_META_CONTEXT, struct.pack(">I", ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._reply(opt, REP_ACK)

    # -- transmission

    def _transmission(self) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = REQUEST.unpack(self._recv(REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _Closed()
            payload = None
            if cmd == CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _Closed()  # beyond the advertised maximum: the spec allows hanging up
                payload = self._recv(length)
            if cmd == CMD_DISC:
                return
            self._request(cmd, flags, handle, offset, length, payload)

    def _request(self, cmd: int, flags: int, handle: int, offset: int, length: int,
                 payload: bytearray | None) -> None:  # fmt: skip
        srv = self.server
        problem = self._check(cmd, flags, offset, length)
        if problem is not None:
            self._error(handle, *problem)
            return
        if cmd == CMD_READ:
            self._read(handle, offset, length)
            return
        if cmd == CMD_BLOCK_STATUS:
            self._block_status(handle, offset, length, bool(flags & CMD_FLAG_REQ_ONE))
            return
        try:  # the disk's errors are answered; the socket's end the connection (they are not caught here)
            ov = srv.overlay
            if cmd == CMD_WRITE:
                assert ov is not None and payload is not None
                ov.write(offset, payload)
            elif cmd == CMD_WRITE_ZEROES:
                assert ov is not None
                ov.zero(offset, length, punch=not flags & CMD_FLAG_NO_HOLE)
            elif cmd == CMD_TRIM:
                assert ov is not None
                ov.trim(offset, length)
            elif cmd == CMD_CACHE:
                srv.disk.read(offset, length)  # decoded blocks stay in the view's cache
            if ov is not None and (cmd == CMD_FLUSH or (flags & CMD_FLAG_FUA and cmd != CMD_CACHE)):
                ov.flush()
        except (ImagechainError, OSError) as e:
            code = ENOSPC if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else EIO
            message = str(e) if isinstance(e, ImagechainError) else f"{e.strerror or e}"
            srv.log(f"serve: {_CMD_NAMES[cmd]} of {length} bytes at {offset} failed: {message}")
            self._error(handle, code, message)
            return
        self._ok(handle)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """The error a request gets before anything is done, if any (proto.md, "Error values")."""
        srv = self.server
        allowed = CMD_FLAG_FUA | {CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE, CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE}.get(cmd, 0)
        if cmd not in _CMD_NAMES:
            return EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return EINVAL, f"flags {flags:#x} not valid for {_CMD_NAMES[cmd]}"
        if cmd == CMD_FLUSH:
            return None
        writes = cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM)
        if writes and srv.overlay is None:
            return EPERM, "the export is read-only (serve it with --overlay FILE to write)"
        if offset + length > srv.size:
            return (ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL), "request beyond the end of the export"
        if cmd in (CMD_READ, CMD_WRITE, CMD_CACHE) and length > MAX_REQUEST:
            return EINVAL, f"request larger than the maximum block size ({MAX_REQUEST} bytes)"
        if cmd == CMD_BLOCK_STATUS:
            if not self.structured or not self.contexts:
                return EINVAL, "block status needs structured replies and base:allocation selected"
            if length == 0:
                return EINVAL, "block status of an empty range"
        return None

    def _ok(self, handle: int) -> None:
        self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))

    def _error(self, handle: int, code: int, message: str) -> None:
        if self.structured:
            text = message.encode()[:4096]
            self._send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + len(text)),
                       struct.pack(">IH", code, len(text)), text)  # fmt: skip
        else:
            self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))

    def _read(self, handle: int, offset: int, length: int) -> None:
        """The whole range is read (and proven) before anything is sent, so a corrupt block becomes a clean
        EIO for this request, never a torn reply. Structured replies send zero runs as holes."""
        srv = self.server
        try:
            data = srv.disk.read(offset, length)
            # holes are worth a lookup only in reads longer than a block (a block is all data or all zeros)
            extents = srv.disk.extents(offset, length) if self.structured and length > srv.disk.block_size else []
        except (ImagechainError, OSError) as e:  # OSError: the overlay's file
            message = str(e) if isinstance(e, ImagechainError) else f"{e.strerror or e}"
            srv.log(f"serve: read of {length} bytes at {offset} failed (EIO): {message}")
            self._error(handle, EIO, message)
            return
        if not self.structured:
            self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data)
            return
        if not length:
            self._send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
            return
        chunks: list[tuple[int, int, bool]] = []  # (offset, length, data?) covering the request exactly
        end = offset + length
        for x in extents:
            a, z = max(x.offset, offset), min(x.offset + x.length, end)
            if z <= a:
                continue
            is_data = x.kind == spec.BLOCK_DATA
            if chunks and chunks[-1][2] == is_data and chunks[-1][0] + chunks[-1][1] == a:
                chunks[-1] = (chunks[-1][0], z - chunks[-1][0], is_data)
            else:
                chunks.append((a, z - a, is_data))
        if not chunks or chunks[0][0] != offset or sum(c[1] for c in chunks) != length:
            chunks = [(offset, length, True)]  # no lookup, or extents that do not tile the range: all data
        mv = memoryview(data)
        parts: list[bytes | memoryview] = []
        for i, (a, n, is_data) in enumerate(chunks):
            done = REPLY_FLAG_DONE if i == len(chunks) - 1 else 0
            if is_data:
                parts += [CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_OFFSET_DATA, handle, 8 + n),
                          struct.pack(">Q", a), mv[a - offset : a - offset + n]]  # fmt: skip
            else:
                parts += [CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_OFFSET_HOLE, handle, 12),
                          struct.pack(">QI", a, n)]  # fmt: skip
        self._send(*parts)

    def _block_status(self, handle: int, offset: int, length: int, req_one: bool) -> None:
        """base:allocation from the block map: DATA 0, ZERO reads as zeros, UNUSED is a hole of zeros.

        Clients ask for the status of everything up to the end of the export and use the first few
        extents (qemu-img asks again at each chunk it copies), so the range is looked at in growing
        spans until a few dozen extents are known: the reply may stop short, as the protocol allows."""
        disk = self.server.disk
        end = offset + length
        descs: list[list[int]] = []
        pos, span = offset, STATUS_SPAN_BLOCKS * disk.block_size
        while pos < end and len(descs) < STATUS_EXTENTS and not (req_one and len(descs) > 1):
            stop = min(end, pos + span)
            try:
                extents = disk.extents(pos, stop - pos)
            except ImagechainError as e:  # an index frame that fails its proof
                if descs:
                    break  # what is known so far is a valid, shorter answer
                self.server.log(f"serve: block status at {offset} failed (EIO): {e}")
                self._error(handle, EIO, str(e))
                return
            for x in extents:
                a, z = max(x.offset, pos), min(x.offset + x.length, stop)
                if z <= a:
                    continue
                state = STATE_OF.get(x.kind, 0)
                if descs and descs[-1][1] == state:
                    descs[-1][0] += z - a
                else:
                    descs.append([z - a, state])
            pos, span = stop, min(2 * span, 1 << 32)
        if not descs:
            descs = [[length, 0]]
        if req_one:
            descs = descs[:1]
        flat = [v for d in descs for v in d]
        payload = struct.pack(f">I{len(flat)}I", ALLOCATION_ID, *flat)
        self._send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len(payload)),
                   payload)  # fmt: skip


_CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush", CMD_TRIM: "trim",
              CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status"}  # fmt: skip


def _parse_meta(data: bytes) -> tuple[str, list[str]]:
    """Export name and queries of a LIST/SET_META_CONTEXT option; ValueError when it does not add up."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("option data ends early")
        out = data[pos : pos + n]
        pos += n
        return out

    (nlen,) = struct.unpack(">I", take(4))
    name = take(nlen).decode("utf-8", "replace")
    (count,) = struct.unpack(">I", take(4))
    queries = []
    for _ in range(count):
        (qlen,) = struct.unpack(">I", take(4))
        queries.append(take(qlen).decode("utf-8", "replace"))
    if pos != len(data):
        raise ValueError("option data longer than its queries")
    return name, queries
