"""NBD serve and export with real clients: qemu-img, qemu-io, nbdinfo and nbdcopy against `imagechain serve`
run as a user runs it (the console script in a subprocess), plus a small client of our own for the
handshake and the replies no tool shows. What must hold: every client reads exactly the point's volume,
block status says what is data and what reads as zeros, an overlay takes writes without touching the
repository and keeps them across restarts, a corrupt block fails only the reads that touch it, and
exports in every format are the volume bit for bit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.crypto import Passphrase
from imagechain.engine.backup import backup
from imagechain.errors import MountError, UsageError
from imagechain.format import spec
from imagechain.format.reader import PointReader
from imagechain.nbd import server as nbd
from imagechain.nbd.overlay import GRANULE, Overlay, record_path
from imagechain.sizes import human
from imagechain.view import PointView

from .conftest import error_lines, exe, need_tool, write_volume
from .fsfill import make_fs, mounted_fs

MiB = 1 << 20
BS = 64 << 10


@pytest.fixture(autouse=True)
def _tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
    monkeypatch.setenv("IMAGECHAIN_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("IMAGECHAIN_PASSPHRASE", raising=False)


def ic(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})  # fmt: skip


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=120)


def ok(*args: object) -> str:
    p = run(*args)
    assert p.returncode == 0, f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@dataclass
class Served:
    proc: subprocess.Popen[str]
    uri: str
    line: str
    stderr: str = ""
    code: int | None = None


@contextlib.contextmanager
def serving(point: str, *args: object, stop: int = signal.SIGTERM) -> Iterator[Served]:
    """`imagechain serve` in a subprocess, on a free port unless args say otherwise; stopped by a signal."""
    where = [] if any(a in ("--socket", "--listen") for a in args) else ["--listen", "127.0.0.1:0"]
    p = subprocess.Popen([exe(), "serve", point, *where, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    ready, _, _ = select.select([p.stdout], [], [], 60)
    line = p.stdout.readline() if ready else ""
    if not line.startswith("serving point "):
        p.kill()
        raise AssertionError(f"serve did not start: {line!r} {p.stderr.read()}")
    s = Served(p, line.split()[-1], line.strip())
    try:
        yield s
    finally:
        if p.poll() is None:
            p.send_signal(stop)
        try:
            s.stderr = p.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        s.code = p.returncode


def make_volume(path: Path, size: int, seed: int, zero_fraction: float = 0.3) -> bytes:
    data = write_volume(path, size, seed=seed, zero_fraction=zero_fraction)
    # a large zero region whatever the random layout: exports must stay sparse over it
    data = data[: size // 2] + bytes(size // 4) + data[size // 2 + size // 4 :]
    path.write_bytes(data)
    return data


def repo_hashes(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file()}  # fmt: skip


# -- a minimal client of our own: what the tools do not show (option replies, error codes, chunks)


class NbdError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"NBD error {code}: {message}")
        self.code, self.message = code, message


class Client:
    def __init__(self, address: str, structured: bool = True, go: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(address)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt, hflags) == (nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
        self.structured = False
        self.handle = 0
        self.size = self.flags = 0
        if structured:
            assert self.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
            self.structured = True
            got = self.option(nbd.OPT_SET_META_CONTEXT, meta_data("", ["base:allocation"]))
            assert got[-1] == (nbd.REP_ACK, b"") and got[0][1][4:] == b"base:allocation"
            self.context = struct.unpack(">I", got[0][1][:4])[0]
        if go:
            replies = self.option(nbd.OPT_GO, struct.pack(">IH", 0, 1) + struct.pack(">H", nbd.INFO_BLOCK_SIZE))
            assert replies[-1][0] == nbd.REP_ACK, replies
            info = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies if t == nbd.REP_INFO}
            self.size, self.flags = struct.unpack(">QH", info[nbd.INFO_EXPORT])

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            if not more:
                raise EOFError("server closed the connection")
            buf += more
        return buf

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, kind, n = struct.unpack(">QIII", self.recv(20))
            assert (magic, o) == (nbd.OPT_REPLY_MAGIC, opt)
            out.append((kind, self.recv(n)))
            if kind == nbd.REP_ACK or kind & (1 << 31):
                return out

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> int:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, self.handle, offset, length) + payload)
        return self.handle

    def reply(self, read_length: int = 0, offset: int = 0) -> tuple[bytes, list[tuple[int, int]]]:
        """Data of a read (holes filled in) or block-status descriptors; NbdError for an error."""
        magic: int | None
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            code, _h = struct.unpack(">IQ", self.recv(12))
            if code:
                raise NbdError(code, "")
            return self.recv(read_length), []
        assert magic == nbd.STRUCTURED_REPLY_MAGIC
        data, descs, error = bytearray(read_length), [], None
        while True:
            if magic is None:
                (magic,) = struct.unpack(">I", self.recv(4))
                assert magic == nbd.STRUCTURED_REPLY_MAGIC
            flags, kind, _h, n = struct.unpack(">HHQI", self.recv(16))
            magic = None
            body = self.recv(n)
            if kind == nbd.REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack(">Q", body[:8])
                data[at - offset : at - offset + n - 8] = body[8:]
            elif kind == nbd.REPLY_TYPE_OFFSET_HOLE:
                at, hole = struct.unpack(">QI", body)
                data[at - offset : at - offset + hole] = bytes(hole)
            elif kind == nbd.REPLY_TYPE_BLOCK_STATUS:
                vals = struct.unpack(f">{(n - 4) // 4}I", body[4:])
                descs = list(zip(vals[::2], vals[1::2], strict=True))
            elif kind == nbd.REPLY_TYPE_ERROR:
                code, mlen = struct.unpack(">IH", body[:6])
                error = NbdError(code, body[6 : 6 + mlen].decode())
            if flags & nbd.REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        return bytes(data), descs

    def read(self, offset: int, length: int) -> bytes:
        self.request(nbd.CMD_READ, offset, length)
        return self.reply(length, offset)[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.request(nbd.CMD_DISC)
        self.sock.close()


def meta_data(name: str, queries: list[str]) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


# -- the protocol, in-process


def test_handshake_options_and_replies(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 8 * MiB, seed=1)
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    sock = str(tmp_path / "nbd.sock")
    with PointView(res.repo, res.point, cat=res.catalog) as view, nbd.NbdServer(view, description="d") as srv:
        assert srv.listen_unix(sock) == f"nbd+unix:///?socket={sock}"
        srv.start_background()

        c = Client(sock, structured=False, go=False)
        assert c.option(nbd.OPT_LIST) == [(nbd.REP_SERVER, struct.pack(">I", 0) + b"d"), (nbd.REP_ACK, b"")]
        assert c.option(nbd.OPT_LIST, b"x")[0][0] == nbd.REP_ERR_INVALID
        assert c.option(99)[0][0] == nbd.REP_ERR_UNSUP
        assert c.option(nbd.OPT_STARTTLS)[0][0] == nbd.REP_ERR_UNSUP
        assert c.option(nbd.OPT_INFO, struct.pack(">I", 1) + b"x" + struct.pack(">H", 0))[0][0] == nbd.REP_ERR_UNKNOWN
        assert c.option(nbd.OPT_INFO, b"\0\0")[0][0] == nbd.REP_ERR_INVALID  # too short
        # metadata contexts need structured replies first
        assert c.option(nbd.OPT_LIST_META_CONTEXT, meta_data("", []))[0][0] == nbd.REP_ERR_INVALID
        assert c.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
        listed = c.option(nbd.OPT_LIST_META_CONTEXT, meta_data("", []))
        assert listed == [(nbd.REP_META_CONTEXT, b"\0\0\0\0base:allocation"), (nbd.REP_ACK, b"")]
        assert c.option(nbd.OPT_LIST_META_CONTEXT, meta_data("", ["qemu:"])) == [(nbd.REP_ACK, b"")]
        assert c.option(nbd.OPT_SET_META_CONTEXT, meta_data("", ["base:allocation"])[:-3])[0][0] == nbd.REP_ERR_INVALID
        chosen = c.option(nbd.OPT_SET_META_CONTEXT, meta_data("", ["qemu:dirty-bitmap:x", "base:allocation"]))
        assert len(chosen) == 2 and chosen[0][0] == nbd.REP_META_CONTEXT and chosen[0][1][4:] == b"base:allocation"
        info = c.option(nbd.OPT_INFO, struct.pack(">IH", 0, 0))
        assert info[-1] == (nbd.REP_ACK, b"")
        items = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in info if t == nbd.REP_INFO}
        size, flags = struct.unpack(">QH", items[nbd.INFO_EXPORT])
        assert size == len(data)
        assert flags & nbd.TF_READ_ONLY and flags & nbd.TF_CAN_MULTI_CONN and flags & nbd.TF_SEND_FLUSH
        assert not flags & (nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES)
        assert struct.unpack(">III", items[nbd.INFO_BLOCK_SIZE]) == (1, BS, 32 * MiB)
        assert c.option(nbd.OPT_GO, struct.pack(">IH", 0, 0))[-1] == (nbd.REP_ACK, b"")
        c.structured, c.context = True, struct.unpack(">I", chosen[0][1][:4])[0]

        # transmission: structured reads (zero runs come as holes), errors that do not end the connection
        for off, n in ((0, len(data)), (12345, 777_777), (len(data) - 1, 1), (3 * MiB, 0)):
            assert c.read(off, n) == data[off : off + n]
        for cmd, off, n, code in ((nbd.CMD_READ, len(data) - 10, 11, nbd.EINVAL),
                                  (nbd.CMD_READ, 0, 32 * MiB + 1, nbd.EINVAL),
                                  (nbd.CMD_TRIM, 0, 4096, nbd.EPERM), (nbd.CMD_WRITE_ZEROES, 0, 4096, nbd.EPERM),
                                  (nbd.CMD_WRITE, 0, 4096, nbd.EPERM), (42, 0, 0, nbd.EINVAL)):  # fmt: skip
            c.request(cmd, off, n, payload=bytes(n) if cmd == nbd.CMD_WRITE else b"")
            with pytest.raises(NbdError) as e:
                c.reply(n if cmd == nbd.CMD_READ else 0, off)
            assert e.value.code == code and e.value.message
        c.request(nbd.CMD_FLUSH)
        assert c.reply() == (b"", [])
        c.request(nbd.CMD_CACHE, 0, MiB)
        assert c.reply() == (b"", [])
        # block status: whole blocks, data exactly where the volume is not all zeros
        c.request(nbd.CMD_BLOCK_STATUS, 0, len(data))
        descs = c.reply()[1]
        assert sum(n for n, _ in descs) == len(data) and all(n % BS == 0 for n, _ in descs)
        pos = 0
        for n, state in descs:
            zero = not any(data[pos : pos + n])
            assert state == (nbd.STATE_ZERO if zero else 0), (pos, n, state)
            if state == 0:
                assert all(any(data[b : b + BS]) for b in range(pos, pos + n, BS))
            pos += n
        c.request(nbd.CMD_BLOCK_STATUS, 0, len(data), flags=nbd.CMD_FLAG_REQ_ONE)
        assert c.reply()[1] == descs[:1]
        c.close()

        # the oldest way in: NBD_OPT_EXPORT_NAME (124 zero bytes without NO_ZEROES), simple replies
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(sock)
        raw = Client.__new__(Client)
        raw.sock, raw.handle, raw.structured = s, 0, False
        raw.recv(18)
        s.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE))
        s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 0))
        size, flags = struct.unpack(">QH", raw.recv(10))
        assert size == len(data) and raw.recv(124) == bytes(124)
        assert raw.read(BS - 100, 3 * BS) == data[BS - 100 : 4 * BS - 100]
        raw.request(nbd.CMD_BLOCK_STATUS, 0, BS)  # no context was selected
        with pytest.raises(NbdError):
            raw.reply()
        raw.close()

        # an unknown export name on NBD_OPT_EXPORT_NAME can only be answered by hanging up
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(sock)
        s.recv(18)
        s.sendall(struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 3) + b"abc")
        assert s.recv(10) == b""
        s.close()
    assert not os.path.exists(sock)  # stop() removes the socket


# -- real clients, through the CLI


def test_qemu_img_reads_the_latest_and_an_earlier_point(tmp_path: Path, repo: Path) -> None:
    vol, first = tmp_path / "vol.img", tmp_path / "first.img"
    v0 = make_volume(vol, 32 * MiB, seed=2)
    first.write_bytes(v0)
    backup(str(vol), str(repo))
    v1 = bytearray(v0)
    for b in (3, 100, 200, 411):
        v1[b * BS + 1000 : b * BS + 9000] = os.urandom(8000)
    v1[20 * MiB : 21 * MiB] = bytes(MiB)  # data that became zeros
    vol.write_bytes(v1)
    backup(str(vol), str(repo))
    with serving(f"{repo}::default") as latest, serving(f"{repo}::default@0") as full:
        assert "read-only" in latest.line and latest.uri.startswith("nbd://127.0.0.1:")
        info = json.loads(ok("qemu-img", "info", "--output=json", "-f", "raw", latest.uri))
        assert info["virtual-size"] == len(v1)
        ok("qemu-img", "compare", "-f", "raw", "-F", "raw", latest.uri, vol)
        ok("qemu-img", "compare", "-f", "raw", "-F", "raw", full.uri, first)
        assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", full.uri, vol).returncode == 1  # they differ
        assert "is_read_only: true" in ok("nbdinfo", latest.uri)
    assert latest.code == 143
    assert error_lines(latest.stderr) == ["imagechain: interrupted (SIGTERM); the server stopped"]


def test_map_shows_data_zero_and_unused_blocks(tmp_path: Path, repo: Path) -> None:
    need_tool("mkfs.ext4")
    src = tmp_path / "files"
    src.mkdir()
    (src / "random.bin").write_bytes(os.urandom(3 * MiB))
    (src / "text.txt").write_bytes(b"hello block status\n" * 20_000)
    vol = tmp_path / "ext4.img"
    with open(vol, "wb") as f:
        f.truncate(32 * MiB)
    ok("mkfs.ext4", "-q", "-F", "-d", src, vol)  # used blocks hold data or zeros; the free ones are unused
    data = vol.read_bytes()
    backup(str(vol), str(repo))
    with serving(f"{repo}::default") as s:
        extents = json.loads(ok("nbdinfo", "--map", "--json", s.uri))
        ok("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, vol)
    pos, kinds = 0, set()
    for e in extents:
        assert e["offset"] == pos and (e["length"] % BS == 0 or e["offset"] + e["length"] == len(data))
        chunk = data[e["offset"] : e["offset"] + e["length"]]
        if e["type"] == 0:  # data: no block of it is all zeros (those are recorded as zero blocks)
            assert all(any(chunk[i : i + BS]) for i in range(0, len(chunk), BS))
        else:
            assert e["type"] in (nbd.STATE_ZERO, nbd.STATE_ZERO | nbd.STATE_HOLE) and not any(chunk)
        kinds.add(e["type"])
        pos += e["length"]
    assert pos == len(data) and kinds == {0, 2, 3}  # data, zero blocks, blocks ext4 does not use


def test_nbdcopy_and_concurrent_clients(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 48 * MiB, seed=3)
    backup(str(vol), str(repo))
    sock = tmp_path / "s.sock"
    with serving(f"{repo}::default", "--socket", sock, stop=signal.SIGINT) as s:
        assert s.uri == f"nbd+unix:///?socket={sock}"
        assert run("nbdinfo", "--can", "multi-conn", s.uri).returncode == 0
        out = tmp_path / "copy.img"
        ok("nbdcopy", "--connections=4", "--requests=16", s.uri, out)  # four connections, reads interleaved
        assert out.read_bytes() == data
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _: run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, vol), range(4)))
        assert [r.returncode for r in runs] == [0] * 4, [r.stderr for r in runs]
    assert s.code == 130 and not sock.exists()
    assert s.stderr.splitlines() == ["imagechain: interrupted (SIGINT); the server stopped"]
    with serving(f"{repo}::default") as s:  # stopped while a client streams: still one line
        reader = subprocess.Popen(["nbdcopy", "-C", "1", s.uri, "null:"], stderr=subprocess.DEVNULL)
        select.select([], [], [], 0.1)
    reader.wait(30)
    assert s.code == 143 and s.stderr.splitlines() == ["imagechain: interrupted (SIGTERM); the server stopped"]


def test_overlay_takes_writes_keeps_them_and_never_touches_the_repository(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 16 * MiB, seed=4)
    backup(str(vol), str(repo))
    before = repo_hashes(repo)
    ov = tmp_path / "vm-overlay.img"
    expect = bytearray(data)
    expect[65536:131072] = b"\xab" * 65536
    expect[1000:1100] = b"\xcd" * 100  # inside a granule: the rest of it must stay the point's
    expect[9 * MiB : 10 * MiB] = bytes(MiB)
    with serving(f"{repo}::default", "--overlay", ov) as s:
        assert f"writes go to overlay {ov}" in s.line
        assert "is_read_only: false" in ok("nbdinfo", s.uri)
        ok("qemu-io", "-f", "raw", "-c", "write -P 0xab 65536 65536", "-c", "write -P 0xcd 1000 100",
           "-c", "write -z 9M 1M", "-c", "flush", s.uri)  # fmt: skip
        got = ok("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 65536 65536", "-c", "read -P 0xcd 1000 100", s.uri)
        assert "Pattern verification failed" not in got and got.count("read ") == 2
        out = tmp_path / "now.img"
        ok("nbdcopy", s.uri, out)
        assert out.read_bytes() == bytes(expect)
        ok("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, out)
    assert s.code == 143 and "overlay" in s.stderr and "flushed" in s.stderr
    assert repo_hashes(repo) == before
    assert ov.stat().st_blocks * 512 < 2 * MiB  # sparse: only the written granules take space
    head = json.loads(Path(record_path(str(ov))).read_bytes()[:4096])
    assert head["point_id"] == str(open_point(f"{repo}::default").point.point_id)

    with serving(f"{repo}::default", "--overlay", ov) as s:  # continued: the writes are still there
        assert "continued" in s.line
        out2 = tmp_path / "again.img"
        ok("nbdcopy", s.uri, out2)
        assert out2.read_bytes() == bytes(expect)
    assert repo_hashes(repo) == before

    vol.write_bytes(bytes(expect[:4096]) + data[4096:])
    backup(str(vol), str(repo))  # another point: the overlay is not for it
    p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0", "--overlay", ov)
    assert p.returncode == 2 and len(error_lines(p.stderr)) == 1 and "belongs to point" in p.stderr
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"x")
    p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0", "--overlay", plain)
    assert p.returncode == 2 and "is not an imagechain overlay" in p.stderr and plain.read_bytes() == b"x"


def test_an_overlay_that_cannot_be_made_is_one_line(tmp_path: Path, repo: Path) -> None:
    """On FAT (no sparse files; fusefat refuses to size one: it said a bare 'Operation not permitted'), and
    where the overlay's folder is read-only."""
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=11)
    backup(str(vol), str(repo))
    img = make_fs(tmp_path, "fat32")
    with mounted_fs(img, "fat32", tmp_path / "usb") as usb:
        p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0", "--overlay", usb / "ov.img")
        assert p.returncode == 8, p.stderr
        assert error_lines(p.stderr) == [f"imagechain: error: overlay {usb}/ov.img is on a FAT filesystem, which "
                                         f"has no sparse files (fusefat cannot even size one) and holds at most "
                                         f"4 GiB in a file: put the overlay on another filesystem"]  # fmt: skip
        assert os.listdir(usb) == []
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0", "--overlay", ro / "ov.img")
        assert p.returncode == 8 and error_lines(p.stderr) == [
            f"imagechain: error: cannot create overlay record {ro}/ov.img.imagechain-overlay: Read-only file "
            f"system"], p.stderr  # fmt: skip
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_overlay_flush_orders_data_before_bits(tmp_path: Path, repo: Path) -> None:
    """Unit: granules, zeroing, trims; bits reach the record only with flush, after the data."""
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 4 * MiB + 1234, seed=5)  # a partial last granule
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    path = str(tmp_path / "ov")
    with PointView(res.repo, res.point, cat=res.catalog) as view:
        o = Overlay.open(path, view, res.point.point_id)
        o.write(5000, b"\x11" * 10)
        o.zero(3 * GRANULE + 7, 2 * GRANULE)
        o.trim(100, GRANULE)  # covers no whole granule: nothing happens
        o.write(len(data) - 3, b"end")
        expect = bytearray(data)
        expect[5000:5010] = b"\x11" * 10
        expect[3 * GRANULE + 7 : 5 * GRANULE + 7] = bytes(2 * GRANULE)
        expect[-3:] = b"end"
        assert o.read(0, len(data)) == bytes(expect)
        kinds = {e.kind for e in o.extents(0, len(data))}
        assert spec.BLOCK_DATA in kinds and len(kinds) >= 2
        # not flushed: the record holds no bit yet, so after a crash the point reads as it was, never half a write
        raw_bits = Path(record_path(path)).read_bytes()[4096:]
        assert not any(raw_bits)
        o.flush()
        assert any(Path(record_path(path)).read_bytes()[4096:])
        o.close()
        o = Overlay.open(path, view, res.point.point_id)
        assert o.read(0, len(data)) == bytes(expect) and o.written_bytes == 5 * GRANULE
        with pytest.raises(MountError, match="in use"):
            Overlay.open(path, view, res.point.point_id)
        o.close()
        with pytest.raises(UsageError, match="belongs to point"):
            Overlay.open(path, view, uuid.uuid4())


def test_closing_with_read_ahead_pending_prints_nothing(tmp_path: Path, repo: Path, capfd: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A server stopped while a client streams: the view's pending read-ahead is cancelled, and that must not
    reach the terminal as a traceback (the CLI's stop is one line)."""
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(8 * MiB))
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    view = PointView(res.repo, res.point, cat=res.catalog, threads=1)  # one worker: read-ahead queues up
    for i in range(6):
        view.read(i * 2 * BS, 2 * BS)
    capfd.readouterr()
    caplog.clear()
    nbd.close_view(view)
    assert capfd.readouterr().err == "" and not caplog.records


def test_corrupt_block_fails_only_its_reads(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = os.urandom(16 * MiB)  # random: every block stored as it is
    vol.write_bytes(data)
    backup(str(vol), str(repo))
    res = open_point(f"{repo}::default")
    with PointReader(res.repo.store, res.point) as r:
        idx = r.index()
    e = next(e for e in idx if e["kind"] == spec.BLOCK_DATA and int(e["block"]) == 40)
    f = repo / res.point.segments[0].name
    with open(f, "r+b") as fh:
        fh.seek(spec.SEGMENT_HEADER_SIZE + int(e["offset"]) + int(e["length"]) // 2)
        fh.write(b"\xde\xad\xbe\xef")
    bad = 40 * BS
    sock = tmp_path / "s.sock"
    with serving(f"{repo}::default", "--socket", sock) as s:
        got = run("qemu-io", "-f", "raw", "-r", "-c", f"read {bad + 4096} 4096", s.uri)
        assert "Input/output error" in got.stdout + got.stderr
        ok("qemu-io", "-f", "raw", "-r", "-c", f"read {bad - BS} {BS}", "-c", f"read {bad + BS} {BS}", s.uri)
        c = Client(str(sock))  # the connection survives the error; the data around it is right
        with pytest.raises(NbdError) as err:
            c.read(bad - 100, 200)
        assert err.value.code == nbd.EIO and "block 40" in err.value.message
        assert c.read(0, bad) == data[:bad] and c.read(bad + BS, 3 * BS) == data[bad + BS : bad + 4 * BS]
        c.close()
        assert run("nbdcopy", s.uri, tmp_path / "copy.img").returncode != 0
        assert s.proc.poll() is None  # still serving
        ok("qemu-io", "-f", "raw", "-r", "-c", "read 0 65536", s.uri)
    logged = [line for line in error_lines(s.stderr) if "block 40" in line]
    assert logged and all("failed (EIO)" in line and "corrupt" in line for line in logged)
    p = ic("export", f"{repo}::default", tmp_path / "out.qcow2", "--format", "qcow2")
    assert p.returncode == 7 and len(error_lines(p.stderr)) == 1 and "block 40" in p.stderr
    assert "nothing was written" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("out")) == []


def test_export_every_format(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 32 * MiB, seed=6, zero_fraction=0.6)
    backup(str(vol), str(repo))
    for fmt in ("qcow2", "vhdx", "vmdk", "raw"):
        out = tmp_path / f"disk.{fmt}"
        r = json.loads(ok(exe(), "export", f"{repo}::default", out, "--format", fmt, "--json"))
        assert r["format"] == fmt and r["volume_size"] == len(data) and r["file_bytes"] == out.stat().st_size
        ok("qemu-img", "compare", "-f", fmt, "-F", "raw", out, vol)
        assert json.loads(ok("qemu-img", "info", "--output=json", out))["format"] == fmt
    raw = tmp_path / "disk.raw"
    assert raw.read_bytes() == data
    assert raw.stat().st_blocks * 512 < 0.6 * len(data)  # zero and unused blocks are holes
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    p = ic("export", f"{repo}::default", raw, "--format", "raw")
    assert p.returncode == 8 and "exists" in p.stderr and "--force" in p.stderr and len(error_lines(p.stderr)) == 1
    raw.write_bytes(b"old")
    line = ok(exe(), "export", f"{repo}::default", raw, "--format", "raw", "--force")
    assert line.startswith(f"exported point {str(open_point(f'{repo}::default').point.point_id)[:8]} to {raw} (raw)")
    assert raw.read_bytes() == data
    p = ic("export", f"{repo}::default", repo / "inside.img", "--format", "raw")
    assert p.returncode == 8 and "inside the repository" in p.stderr
    p = ic("export", f"{repo}::default", "", "--format", "raw")
    assert p.returncode == 8 and error_lines(p.stderr) == ["imagechain: error: export target '' names no file"]


def stalled_export(tmp_path: Path, repo: Path, out: Path) -> tuple[subprocess.Popen[str], int]:
    """An export whose qemu-img (a stand-in around the real one) has written the whole image and then waits
    instead of exiting: (the export, the stand-in's pid)."""
    real = run("sh", "-c", "command -v qemu-img").stdout.strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    done = tmp_path / "converted"
    (bin_dir / "qemu-img").write_text(f'#!/bin/sh\n"{real}" "$@" || exit $?\necho $$ > "{done}.tmp"\n'
                                      f'mv "{done}.tmp" "{done}"\nexec sleep 60\n')  # fmt: skip
    (bin_dir / "qemu-img").chmod(0o755)
    proc = subprocess.Popen([exe(), "export", f"{repo}::default", out, "--format", "qcow2"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})  # fmt: skip
    for _ in range(3000):
        if done.exists() or proc.poll() is not None:
            break
        select.select([], [], [], 0.01)
    assert proc.poll() is None, proc.communicate()
    return proc, int(done.read_text())


def test_export_stopped_or_without_qemu_img_leaves_nothing(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    make_volume(vol, 8 * MiB, seed=9)
    backup(str(vol), str(repo))
    out = tmp_path / "disk.qcow2"
    p = ic("export", f"{repo}::default", out, "--format", "qcow2", env={"PATH": str(tmp_path / "nothing")})
    assert p.returncode == 13 and error_lines(p.stderr) == [
        "imagechain: error: qemu-img is not installed; export needs it (Debian: apt-get install qemu-utils)"]
    # a qemu-img that has written the whole image but not exited yet: a stop now must publish nothing
    proc, _stand_in = stalled_export(tmp_path, repo, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("disk.qcow2.tmp-")]  # written, not published
    proc.send_signal(signal.SIGTERM)
    _o, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert error_lines(err) == [f"imagechain: interrupted (SIGTERM); nothing was written to {out}"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("disk.qcow2")]
    assert "sleep 60" not in run("ps", "-eo", "args").stdout.splitlines()  # qemu-img was ended too (whole lines:
    # another process's `sleep 600` is not ours)


def test_a_killed_export_leaves_a_temporary_that_the_next_export_removes(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = make_volume(vol, 8 * MiB, seed=10)
    backup(str(vol), str(repo))
    out = tmp_path / "disk.qcow2"
    proc, stand_in = stalled_export(tmp_path, repo, out)
    proc.kill()  # nothing can clean up after this
    proc.communicate(timeout=30)
    os.kill(stand_in, signal.SIGKILL)
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith("disk.qcow2.tmp-")]
    size = left.stat().st_size
    p = ic("export", f"{repo}::default", out, "--format", "qcow2")
    assert p.returncode == 0, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("notice:")] == [
        f"notice: removed {left} ({human(size)}), left by an export that did not finish"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("disk.qcow2")) == ["disk.qcow2"]
    ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, vol)
    assert vol.read_bytes() == data


def test_encrypted_chain_needs_its_passphrase(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    make_volume(vol, 16 * MiB, seed=7)
    backup(str(vol), str(repo), encrypt=Passphrase(b"correct horse"))
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0")
    assert p.returncode == 11 and len(error_lines(p.stderr)) == 1
    with serving(f"{repo}::default", "--passphrase-file", pw) as s:
        ok("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, vol)
    out = tmp_path / "enc.qcow2"
    ok(exe(), "export", f"{repo}::default", out, "--format", "qcow2", "--passphrase-file", pw)
    ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, vol)


def test_listen_errors_are_one_line(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    make_volume(vol, 4 * MiB, seed=8)
    backup(str(vol), str(repo))
    with serving(f"{repo}::default") as s:
        port = s.uri.rsplit(":", 1)[1]
        p = ic("serve", f"{repo}::default", "--listen", f"127.0.0.1:{port}")
        assert p.returncode == 13
        assert error_lines(p.stderr) == [f"imagechain: error: cannot listen on 127.0.0.1:{port}: address in use"]
    for bad in ("127.0.0.1:http", "::1:10809", "127.0.0.1:70000"):
        p = ic("serve", f"{repo}::default", "--listen", bad)
        assert p.returncode == 2 and len(error_lines(p.stderr)) == 1 and "--listen" in p.stderr
    p = ic("serve", f"{repo}::default", "--listen", "127.0.0.1:0", "--socket", tmp_path / "x")
    assert p.returncode == 2
    assert nbd.parse_listen("[::1]:99") == ("::1", 99) and nbd.parse_listen(":7") == ("127.0.0.1", 7)
    assert nbd.parse_listen("") == ("127.0.0.1", 10809) and nbd.parse_listen("0.0.0.0") == ("0.0.0.0", 10809)
